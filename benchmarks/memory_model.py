"""How far the analytic memory model (cotune/memory.py) is from measured peaks, over a sweep.

Each config runs as a real trial (its own process, as the search runs it) and its
measured peak is set beside ``memory.estimate``: on CPU the process's anonymous peak (heap and
tensors, not the libraries' code or the memory-mapped corpus), which includes the Python + torch
runtime (the fingerprint's baseline), on GPU the CUDA allocator's peak (no runtime term). On
CPU each config also runs once more with its live tensors tracked (every storage an op creates,
until freed; in this process, or each rank under torchrun), the figure the CUDA allocator would
report, beside the estimate's tensor part: that isolates the model from the runtime and from
glibc's heap.

    python benchmarks/memory_model.py              # CPU sweep, about 3 minutes on 2 cores
    python benchmarks/memory_model.py --parallel   # ... plus 2-process layouts (dp, fsdp, tp, pp): 3 more minutes
    python benchmarks/memory_model.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

from cotune import data, hardware, memory, runner
from cotune.config import (
    BatchConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    SoftwareConfig,
    TrialConfig,
    WorkloadConfig,
)

MIB = 2**20
TINY = WorkloadConfig(n_layer=2, n_embd=64, n_head=4, seq_len=64, vocab_size=258)  # cpu-tiny-gpt
LARGER = WorkloadConfig(n_layer=4, n_embd=256, n_head=4, seq_len=128, vocab_size=258)  # 3.3 M parameters
MINIMAL = WorkloadConfig(n_layer=1, n_embd=16, n_head=4, seq_len=16, vocab_size=258)  # the runtime alone
GPT2_SMALL = WorkloadConfig(n_layer=12, n_embd=768, n_head=12, seq_len=1024, vocab_size=50304)
GPT2_MEDIUM = WorkloadConfig(n_layer=24, n_embd=1024, n_head=16, seq_len=1024, vocab_size=50304)


def trial_config(wl: WorkloadConfig, micro: int, precision: str, ckpt: bool, device: str,
                 parallel: ParallelConfig | None = None) -> TrialConfig:
    """Two optimizer steps (the peak needs AdamW's state from the first) and one eval window."""
    par = parallel or ParallelConfig()
    return TrialConfig(
        workload=wl,
        batch=BatchConfig(micro, micro * par.data_parallel, 1),
        parallel=par,
        precision=PrecisionConfig(precision),
        software=SoftwareConfig(activation_checkpointing=ckpt),
        run=RunConfig(device=device, warmup_steps=1, measured_steps=1, token_budget=2 * micro * par.data_parallel * wl.seq_len,
                      eval_tokens=wl.seq_len, timeout_s=600),
    )


def sweep(device: str, parallel: bool) -> list[TrialConfig]:
    if device == "cuda":
        out = [trial_config(wl, b, p, ck, "cuda") for wl, bs in ((GPT2_SMALL, (4, 8, 16)), (GPT2_MEDIUM, (4, 8)))
               for b in bs for p in ("bf16", "fp32") for ck in (False, True)]
        return out
    out = [trial_config(TINY, b, p, ck, "cpu") for b in (8, 32) for p in ("fp32", "bf16") for ck in (False, True)]
    out += [trial_config(LARGER, b, "fp32", ck, "cpu") for b in (4, 16) for ck in (False, True)]
    out += [trial_config(LARGER, 4, "bf16", ck, "cpu") for ck in (False, True)]  # bf16 is emulated here: slow
    if parallel:
        layouts = [ParallelConfig(dp=2), ParallelConfig(fsdp=2), ParallelConfig(tp=2),
                   ParallelConfig(tp=2, sequence_parallel=True),
                   ParallelConfig(pp=2, pp_microbatches=2), ParallelConfig(pp=2, pp_microbatches=4, pp_schedule="gpipe"),
                   ParallelConfig(pp=2, pp_microbatches=4, pp_schedule="interleaved1f1b", pp_virtual_stages=2)]
        out += [trial_config(LARGER, 16, "fp32", False, "cpu", par) for par in layouts]
        out += [trial_config(LARGER, 16, "fp32", True, "cpu", ParallelConfig(fsdp=2)),
                trial_config(LARGER, 4, "bf16", False, "cpu", ParallelConfig(tp=2))]
    return out


def _tracker(config: TrialConfig) -> tuple[object, Callable[[], float]]:
    """A context manager that tracks live tensor bytes, and a function giving their peak.

    Plain tensors: a dispatch mode that sees every storage an op creates until it is freed.
    FSDP2 (which frees and re-gathers storages by resizing them) and tensor parallel
    (DTensors) need torch's MemTracker, which follows both; it is told each new step.
    """

    par = config.parallel
    if par.fsdp > 1 or par.tp > 1 or (par.dp > 1 and par.pp > 1):  # FSDP2 or DTensors (trial/parallelize.py)
        from torch.distributed._tools.mem_tracker import MemTracker

        class StepwiseMemTracker(MemTracker):
            def _pre_fw_hook(self, module, inputs):  # type: ignore[no-untyped-def]
                try:
                    super()._pre_fw_hook(module, inputs)
                except NotImplementedError:  # the root's next forward: a new step; the peak stays
                    self.reset_mod_stats()
                    super()._pre_fw_hook(module, inputs)

        mt = StepwiseMemTracker()
        return mt, lambda: float(sum(v["Total"] for v in mt.get_tracker_snapshot("peak").values()))

    from cotune.trial.live_tensors import LiveTensorBytes

    lb = LiveTensorBytes()
    return lb, lambda: float(lb.peak)


def live_tensor_peak(config: TrialConfig, cache_dir: Path) -> float:
    """The trial run in this process (one rank of it under torchrun) with its live tensors tracked; the peak."""
    from cotune.trial import train

    tracker, peak = _tracker(config)
    # The peak-FLOP/s probe (run when a trial beats the cached figure) would add its matrices.
    with mock.patch.object(hardware, "peak_flops", return_value=(1e12, "benchmark")), tracker:  # type: ignore[attr-defined]
        result = train.train_and_measure(config, cache_dir=cache_dir)
    if result.status != "ok":
        raise RuntimeError(f"in-process trial ended {result.status}: {result.reason}")
    return peak()


def live_tensor_peak_of_ranks(config: TrialConfig, tmp: Path) -> float:
    """The largest rank's live-tensor peak, each rank run under torchrun by this script (``--rank-peak``)."""
    folder = tmp / f"ranks-{time.monotonic_ns()}"
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json())
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
            f"--nproc-per-node={config.parallel.world_size}", __file__, "--rank-peak", str(folder)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=config.run.timeout_s)
    peaks = [float(p.read_text()) for p in folder.glob("peak.*")]
    if out.returncode != 0 or len(peaks) != config.parallel.world_size:
        raise RuntimeError(f"tracked ranks failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return max(peaks)


def _rank_peak_main(folder: Path) -> None:
    """One rank of ``live_tensor_peak_of_ranks``: write this rank's peak to folder/peak.RANK."""
    config = TrialConfig.load(folder / "config.json")
    peak = live_tensor_peak(config, data.default_cache_dir())
    (folder / f"peak.{os.environ.get('RANK', '0')}").write_text(repr(peak))


def measured_peak(config: TrialConfig, tmp: Path, cache_dir: Path) -> float | str:
    """The trial's recorded peak in bytes, or its status when it did not end ``ok`` (e.g. ``oom``)."""
    result = runner.launch_trial(config, tmp / f"trial-{time.monotonic_ns()}", cache_dir=cache_dir)
    if result.status != "ok":
        print(f"    {result.status}: {result.reason} {result.error_tail[-300:]}")
        return result.status
    return float(result.metrics["peak_memory_bytes"])


def label(c: TrialConfig) -> str:
    w, p = c.workload, c.parallel
    layout = ",".join(f"{k}={v}" for k, v in (("dp", p.dp), ("fsdp", p.fsdp), ("tp", p.tp), ("pp", p.pp)) if v > 1)
    if p.sequence_parallel:
        layout += " sp"
    if p.pp > 1:
        layout += f" {p.pp_schedule}×{p.pp_microbatches}"
    return f"{w.n_layer}L {w.n_embd}d T={w.seq_len}" + (f" {layout}" if layout else "")


def pct(estimate: float, measured: float) -> float:
    return 100.0 * (estimate - measured) / measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--parallel", action="store_true", help="add 2-process layouts of the larger shape (CPU)")
    parser.add_argument("--no-tracker", action="store_true", help="skip the live-tensor runs (CPU)")
    parser.add_argument("--rank-peak", type=Path, help=argparse.SUPPRESS)  # internal: one tracked rank
    args = parser.parse_args()
    if args.rank_peak:
        return _rank_peak_main(args.rank_peak)

    fingerprint = hardware.fingerprint()
    runtime = memory.runtime_bytes(fingerprint, args.device)
    cache_dir = data.default_cache_dir()
    cpu = args.device == "cpu"
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base = measured_peak(trial_config(MINIMAL, 1, "fp32", False, "cpu"), tmp, cache_dir) if cpu else 0.0
        if cpu:
            anonymous = fingerprint["hardware"].get("cpu_runtime_anonymous_bytes") or 0
            print(f"runtime: fingerprint anonymous memory after `import torch` "
                  f"{anonymous / MIB:.0f} MiB + trial imports "
                  f"{memory.CPU_TRIAL_IMPORTS_BYTES / MIB:.0f} MiB = {runtime / MIB:.0f} MiB estimated; "
                  f"a minimal trial ({MINIMAL.n_layer} layer, {MINIMAL.n_embd} wide) peaks at {base / MIB:.0f} MiB",
                  flush=True)
        # Every trial process first, while this one is small: Linux carries the launching process's
        # peak RSS into a child's ru_maxrss across fork and exec, so a grown parent inflates it.
        configs = sweep(args.device, args.parallel)
        for c in configs:
            est = memory.estimate(c, runtime_bytes=runtime)
            measured = measured_peak(c, tmp, cache_dir)
            rows.append([c, est, measured, None])
            shown = f"{measured / MIB:.1f} MiB" if isinstance(measured, float) else measured
            print(f"  {label(c)} B={c.batch.micro_batch_size} {c.precision.precision} "
                  f"ckpt={c.software.activation_checkpointing}: measured {shown}, "
                  f"estimate {est.total / MIB:.1f} MiB ({est.phase})", flush=True)
        t1 = time.perf_counter()
        if cpu and not args.no_tracker:
            for row in (r for r in rows if isinstance(r[2], float)):
                one = row[0].parallel.world_size == 1
                row[3] = live_tensor_peak(row[0], cache_dir) if one else live_tensor_peak_of_ranks(row[0], tmp)
    print(f"\n{len(rows)} trials in {t1 - t0:.0f} s, live-tensor runs in {time.perf_counter() - t1:.0f} s\n")
    print_table(rows, base, cpu)


def print_table(rows: list, base: float, cpu: bool) -> None:
    """A markdown table: measured vs estimated peak, then the non-runtime parts, then live tensors."""
    head = "| workload | micro batch | precision | ckpt | measured MiB | estimate MiB | error |"
    rule = "|---|---:|---|---|---:|---:|---:|"
    if cpu:
        head += " measured − runtime | estimate − runtime | error | live tensors MiB | tensor estimate | error |"
        rule += "---:|---:|---:|---:|---:|---:|"
    print(head)
    print(rule)
    errors: dict[str, list[float]] = {"total": [], "beyond runtime": [], "live tensors": []}
    for c, est, measured, tracked in rows:
        if not isinstance(measured, float):  # oom, say: the estimate should exceed the device
            print(f"| {label(c)} | {c.batch.micro_batch_size} | {c.precision.precision} | "
                  f"{'yes' if c.software.activation_checkpointing else 'no'} | {measured} | {est.total / MIB:.1f} | – |")
            continue
        errors["total"].append(pct(est.total, measured))
        line = (f"| {label(c)} | {c.batch.micro_batch_size} | {c.precision.precision} | "
                f"{'yes' if c.software.activation_checkpointing else 'no'} | {measured / MIB:.1f} | "
                f"{est.total / MIB:.1f} | {errors['total'][-1]:+.1f}% |")
        if cpu:
            beyond, est_beyond = measured - base, est.total - est.runtime
            errors["beyond runtime"].append(pct(est_beyond, beyond))
            line += f" {beyond / MIB:.1f} | {est_beyond / MIB:.1f} | {errors['beyond runtime'][-1]:+.1f}% |"
            if tracked is not None:
                errors["live tensors"].append(pct(est.tensors, tracked))
                line += f" {tracked / MIB:.1f} | {est.tensors / MIB:.1f} | {errors['live tensors'][-1]:+.1f}% |"
            else:
                line += " – | – | – |"
        print(line)
    print()
    for name, errs in errors.items():
        if errs:
            print(f"mean absolute error, {name}: {statistics.fmean(abs(e) for e in errs):.1f}% "
                  f"(worst {max(errs, key=abs):+.1f}%, {len(errs)} trials)")
    if cpu:
        big = [pct(est.total - est.runtime, measured - base) for c, est, measured, _ in rows
               if c.workload != TINY and isinstance(measured, float)]
        if big:
            print(f"mean absolute error beyond runtime, {LARGER.n_layer}L {LARGER.n_embd}d only: "
                  f"{statistics.fmean(abs(e) for e in big):.1f}% (the tiny model's few MiB are within the "
                  "runtime's own run-to-run spread)")


if __name__ == "__main__":
    main()
