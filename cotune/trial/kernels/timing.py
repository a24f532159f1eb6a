"""Each Triton kernel a trial runs, timed alone at the trial's shapes beside the PyTorch op it
replaces, forward and backward, and cached on disk.

The cache key is everything that decides the figure: kernel, shape, dtype, tiles, device
name, the Triton and torch versions (a new compiler makes new code), the kernel's source
(a hash of its module) and cotune's version. The timed call is the one training makes
(the cross-entropy writes the logits' gradient over them, as in a trial). A trial whose
tiles were already measured for its shapes on this device reuses the figure instead of
benchmarking again. On a GPU the timer is ``triton.testing.do_bench`` (median over
repeats, L2 flushed between them); on CPU the kernels run in Triton's interpreter, so
the figure (wall time, median of a few repeats) says how the path behaves, not how fast
the kernel is.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cotune import __version__, hardware
from cotune.config import TrialConfig
from cotune.tiles import kernel_shapes, kernel_tiles
from cotune.trial.kernels import cross_entropy as ce_module
from cotune.trial.kernels import layernorm as ln_module
from cotune.trial.kernels import mlp as mlp_module
from cotune.trial.kernels.cross_entropy import cross_entropy
from cotune.trial.kernels.layernorm import layer_norm
from cotune.trial.kernels.mlp import linear_bias_gelu

CPU_REPEATS = 3


def time_kernels(config: TrialConfig, device: torch.device, cache_path: Path | None) -> list[dict[str, Any]]:
    """One record per kernel the config runs in Triton: its and PyTorch's forward + backward milliseconds."""
    import triton

    k = config.kernels
    dtype_name = config.precision.precision
    shapes = kernel_shapes(config)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    keys = {kernel: {"kernel": kernel, "shape": shapes[kernel], "dtype": dtype_name,
                     "tiles": asdict(kernel_tiles(k, kernel)), "device": device_name,
                     "triton": triton.__version__, "torch": torch.__version__, "source": source_hash(kernel),
                     "cotune": __version__} for kernel in k.selected()}
    texts = {kernel: json.dumps(key, sort_keys=True) for kernel, key in keys.items()}
    with _locked(cache_path) as cache:
        known = {kernel: cache[text] for kernel, text in texts.items() if text in cache}
    measured = {}
    for kernel in keys.keys() - known.keys():  # timed outside the lock: other trials may read meanwhile
        w = workload(kernel, shapes[kernel], keys[kernel]["tiles"], hardware.torch_dtype(dtype_name), device)
        measured[kernel] = {"triton_ms": time_ms(w.step(w.kernel), device),
                            "torch_ms": time_ms(w.step(w.reference), device),
                            "timer": "triton.testing.do_bench" if device.type == "cuda" else "wall clock, interpreter"}
    if measured:
        with _locked(cache_path) as cache:
            cache.update({texts[kernel]: figure for kernel, figure in measured.items()})
    return [{**keys[kernel], **(known.get(kernel) or measured[kernel]), "cached": kernel in known}
            for kernel in keys]


def source_hash(kernel: str) -> str:
    """A short hash of the module that holds ``kernel``'s Triton code: an edited kernel is timed again."""
    module = {"mlp": mlp_module, "cross_entropy": ce_module, "layernorm": ln_module}[kernel]
    return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()[:16]


@dataclass
class Workload:
    """One kernel's inputs at a shape, its Triton forward and the PyTorch forward it replaces."""

    inputs: tuple[torch.Tensor, ...]
    grad: torch.Tensor | None  # the output's gradient for backward (None: a scalar loss)
    kernel: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]

    def step(self, forward: Callable[..., torch.Tensor]) -> Callable[[], None]:
        """A call running ``forward`` (the kernel, the reference, or a compiled reference) and its backward."""
        return lambda: forward(*self.inputs).backward(self.grad)


def workload(kernel: str, shape: dict[str, int], tiles: dict[str, int], dtype: torch.dtype,
             device: torch.device) -> Workload:
    """Random inputs of ``shape`` for ``kernel``, with ``tiles`` (``asdict`` of its tiles) bound to the kernel."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*size: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_(grad)

    if kernel == "mlp":
        M, N, K = shape["M"], shape["N"], shape["K"]
        return Workload((rand(M, K), rand(N, K, scale=K**-0.5), rand(N)), rand(M, N, grad=False),
                        lambda x, w, b: linear_bias_gelu(x, w, b, **tiles),
                        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"))
    if kernel == "cross_entropy":
        N, V = shape["N"], shape["V"]
        y = torch.randint(0, V, (N,), generator=g).to(device)
        # As in training, the kernel writes the logits' gradient over them (there the logits are the
        # loss's alone; here a view, so they are not a leaf): each repeat then reads the previous
        # gradient, which is the same work.
        return Workload((rand(N, V), y), None,
                        lambda logits, t: cross_entropy(logits.view_as(logits), t, overwrite_logits=True, **tiles),
                        lambda logits, t: F.cross_entropy(logits.float(), t))
    if kernel == "layernorm":
        M, C = shape["M"], shape["C"]
        return Workload((rand(M, C), rand(C), rand(C)), rand(M, C, grad=False),
                        lambda x, w, b: layer_norm(x, w, b, 1e-5, **tiles),
                        lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5))
    raise ValueError(f"kernel must be one of mlp, cross_entropy, layernorm, but got {kernel!r}")


def time_ms(fn: Callable[[], None], device: torch.device) -> float:
    """Milliseconds per call: do_bench's median on a GPU, the median of a few wall-clock calls on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # the first call pays for tracing; it is not timed
    times = []
    for _ in range(CPU_REPEATS):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def _locked(path: Path | None) -> Iterator[dict[str, Any]]:
    """The cache as a dict, under an exclusive lock; what the block leaves in it is written back atomically."""
    if path is None:
        yield {}
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = json.loads(path.read_text()) if path.exists() else {}
        before = dict(cache)
        yield cache
        if cache != before:
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
            tmp.replace(path)
