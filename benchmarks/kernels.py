"""cotune's Triton kernels against PyTorch eager (cuBLAS) and torch.compile, at a space's shapes.

For each kernel the space tunes (fused MLP matmul + bias + GELU, cross-entropy, LayerNorm),
every tile config of the space that passes the tile rules is timed, forward + backward,
with ``triton.testing.do_bench`` (median), beside the PyTorch op it replaces, eager and
compiled. The matmul is reported in TFLOP/s (6·M·N·K per forward + backward) and % of the
datasheet peak; the row kernels in GB/s of the bytes they must move and % of the
datasheet bandwidth; the cross-entropy also by its peak memory.

    python benchmarks/kernels.py                                   # the 1-GPU space's shapes
    python benchmarks/kernels.py --space benchmarks/spaces/gpu-8-gpt2-medium.yaml --vocab 50304
    python benchmarks/kernels.py --cpu-interpreter                 # no GPU: check the script's path

Without a CUDA GPU it says so and exits 0; ``--cpu-interpreter`` then runs the same loop in
Triton's interpreter on the tiny CPU space (wall-clock times that say nothing about speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cotune import derive, hardware, tiles  # noqa: E402
from cotune.config import KERNELS  # noqa: E402
from cotune.space import KNOBS, load_space  # noqa: E402


def tile_space(space, config, kernel: str, shared_memory: int | None) -> list:
    """Every tile config of the space for ``kernel`` that the tile rules let run (the config's own if untuned)."""
    default = tiles.kernel_tiles(config.kernels, kernel)
    # The kernel's tile knobs, registered in the order its tiles dataclass takes them.
    knobs = [n for n, knob in KNOBS.items() if knob.tile_of == kernel]
    choices = [space.knobs[n].values() if n in space.knobs else [getattr(default, f)]
               for n, f in zip(knobs, asdict(default), strict=True)]
    cls = type(default)
    dtype_bytes = 4 if config.precision.precision == "fp32" else 2
    shape = tiles.kernel_shapes(config)[kernel]
    return [t for t in (cls(*map(int, c)) for c in itertools.product(*choices))
            if not tiles.infeasible_reason(kernel, t, shape, dtype_bytes, shared_memory)]


def label_of(t: tiles.MatmulTiles | tiles.RowTiles) -> str:
    if isinstance(t, tiles.MatmulTiles):
        return f"{t.block_m}x{t.block_n}x{t.block_k} group {t.group_m}, {t.num_warps} warps, {t.num_stages} stages"
    return f"block {t.block_size}, {t.num_warps} warps"


def work(kernel: str, shape: dict[str, int], dtype_bytes: int) -> tuple[float, str]:
    """The figure a kernel is judged by per forward + backward: FLOPs for the matmul, bytes for the row kernels."""
    if kernel == "mlp":  # forward x·Wᵀ, backward dx and dW: three M·N·K matmuls
        return 6.0 * shape["M"] * shape["N"] * shape["K"], "TFLOP/s"
    if kernel == "cross_entropy":  # read the logits, write their gradient (fp32 math in registers)
        return 2.0 * shape["N"] * shape["V"] * dtype_bytes, "GB/s"
    # LayerNorm: forward reads x and writes y; backward reads x and dy and writes dx
    return 5.0 * shape["M"] * shape["C"] * dtype_bytes, "GB/s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", type=Path, default=ROOT / "benchmarks" / "spaces" / "gpu-1-gpt2-small.yaml")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the space's baseline")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default: the space's baseline)")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary (50304: GPT-2 tokens, padded)")
    parser.add_argument("--cpu-interpreter", action="store_true",
                        help="run in Triton's interpreter on CPU at cpu-triton-tiny's shapes (checks the path only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    if args.cpu_interpreter:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        if args.space == parser.get_default("space"):
            args.space = ROOT / "search_spaces" / "cpu-triton-tiny.yaml"
    import torch

    if not args.cpu_interpreter and not torch.cuda.is_available():
        print("no CUDA GPU here: the Triton kernels' speed is measured on a GPU only, so nothing was timed. "
              "(--cpu-interpreter runs this script's path in Triton's interpreter, without meaning for speed.)")
        return 0
    from cotune.trial.kernels.timing import time_ms, workload

    device = torch.device("cpu" if args.cpu_interpreter else "cuda")
    space = load_space(args.space)
    knobs = {**space.baseline, "kernels": "triton", **{f"{k}_kernel": "triton" for k in KERNELS}}
    knobs = {k: v for k, v in knobs.items() if k in KNOBS}
    if args.micro_batch:
        knobs["micro_batch_size"] = knobs["global_batch_size"] = args.micro_batch
    if args.precision:
        knobs["precision"] = args.precision
    vocab = 256 if args.cpu_interpreter else args.vocab
    config, _ = derive.build_config(space, knobs, world_size=1, vocab_size=vocab)
    precision = config.precision.precision
    dtype = hardware.torch_dtype(precision)
    dtype_bytes = torch.finfo(dtype).bits // 8
    name = "cpu (Triton interpreter)" if args.cpu_interpreter else torch.cuda.get_device_name()
    shared = None if args.cpu_interpreter else hardware.device_shared_memory(torch.cuda.get_device_properties(0), 0)
    flops_peak = None if args.cpu_interpreter else hardware.datasheet_peak(name, precision)
    bw_peak = None if args.cpu_interpreter else hardware.datasheet_bandwidth(name)
    print(f"{name}, {precision}, space {args.space.name}, micro batch {config.batch.micro_batch_size} x "
          f"{config.workload.seq_len} tokens, vocabulary {vocab}; forward + backward, median ms")
    rows = []
    for kernel in KERNELS:
        shape = tiles.kernel_shapes(config)[kernel]
        total, unit = work(kernel, shape, dtype_bytes)
        peak = flops_peak if unit == "TFLOP/s" else bw_peak
        scale = 1e12 if unit == "TFLOP/s" else 1e9

        def row(label: str, ms: float, memory: int | None = None, kernel=kernel, shape=shape, unit=unit,
                total=total, scale=scale, peak=peak) -> dict:
            rate = total / (ms * 1e-3)
            r = {"kernel": kernel, "shape": shape, "impl": label, "ms": ms, unit: rate / scale,
                 "pct_of_peak": 100 * rate / peak[0] if peak else None, "peak_memory_bytes": memory}
            pct = f"{r['pct_of_peak']:5.1f}% of {peak[1]}" if peak else "(no datasheet peak)"
            mem = f"  peak {memory / 2**20:8.1f} MiB" if memory is not None else ""
            print(f"  {label:<52} {ms:9.3f} ms {rate / scale:9.2f} {unit:<8} {pct}{mem}")
            rows.append(r)
            return r

        print(f"{kernel} {shape}:")
        candidates = tile_space(space, config, kernel, shared)
        untuned = asdict(tiles.kernel_tiles(config.kernels, kernel))  # the PyTorch rows ignore the tiles
        runs = [("pytorch eager", untuned, lambda w: w.reference)]
        if not args.cpu_interpreter:  # compiling on CPU takes minutes and is not what is compared
            runs.append(("torch.compile", untuned, lambda w: torch.compile(w.reference)))
        runs += [(f"triton {label_of(t)}", asdict(t), lambda w: w.kernel) for t in candidates]
        for label, tile_values, forward_of in runs:
            w = workload(kernel, shape, tile_values, dtype, device)
            memory = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            try:
                ms = time_ms(w.step(forward_of(w)), device)
            except Exception as e:  # a tile config only the compiler rejects is a result, not the end
                if not tiles.is_out_of_resources(e):
                    raise
                print(f"  {label:<52} infeasible: {str(e).splitlines()[0][:100]}")
                continue
            if device.type == "cuda":
                memory = torch.cuda.max_memory_allocated() - base
            row(label, ms, memory)
        best = min((r for r in rows if r["kernel"] == kernel and r["impl"].startswith("triton")),
                   key=lambda r: r["ms"], default=None)
        eager = next((r for r in rows if r["kernel"] == kernel and r["impl"] == "pytorch eager"), None)
        if best and eager:
            print(f"  best triton / eager time: {best['ms'] / eager['ms']:.2f}x ({best['impl']})")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "precision": precision, "space": str(args.space),
                                         "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
