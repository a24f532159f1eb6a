"""How a trial measures: FLOPs per token, peak memory, eval windows, process age and the profiler pass.

Small pure helpers kept apart from the training loop so each rule is found (and
tested) by name.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cotune.config import WorkloadConfig

TOP_OPS = 15


def flops_per_token(n_params: int, wl: WorkloadConfig) -> int:
    """Training FLOPs per token: 6N for the matmuls (forward 2N, backward 4N) plus 12·L·d·T for attention.

    N excludes the position embedding (PaLM appendix B, nanoGPT's estimate_mfu).
    """
    return 6 * n_params + 12 * wl.n_layer * wl.n_embd * wl.seq_len


def eval_window_starts(n_val_tokens: int, seq_len: int, eval_tokens: int, extra: int = 1) -> np.ndarray:
    """Start indices of eval_tokens // seq_len evenly spaced windows of seq_len + ``extra`` tokens
    (causal LM: inputs + the shifted target; masked LM: extra = 0).

    They depend only on the split's length and these numbers, so every trial of a study is
    scored on the same tokens.
    """
    n_windows = max(1, eval_tokens // seq_len)
    last = n_val_tokens - seq_len - extra  # the last start whose window fits
    return np.linspace(0, last, n_windows).round().astype(np.int64)


def subsample(curve: list[list[float]], max_points: int) -> list[list[float]]:
    """At most ``max_points`` evenly spaced rows, always keeping the first and the last."""
    if len(curve) <= max_points:
        return curve
    keep = np.unique(np.linspace(0, len(curve) - 1, max_points).round().astype(int))
    return [curve[i] for i in keep]


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The allocator's peak on GPU, else the process's peak resident set; bytes and which one it is."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda allocator peak"
    hwm = _vm_hwm_bytes()
    if hwm is not None:
        return hwm, "process peak RSS"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "process peak RSS"


def _vm_hwm_bytes() -> int | None:
    """This process's own RSS high-water mark from /proc (Linux), or None elsewhere.

    getrusage's ru_maxrss is not it: Linux carries the launching process's peak across
    fork and exec, so a trial started by a larger process would report the parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` means the device or host ran out of memory."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e)


def process_age_s() -> float:
    """Seconds since this process was created.

    On Linux psutil's create_time adds the boot time, which /proc/stat gives in whole
    seconds, so ``time.time() - create_time()`` can be up to 1 s off. Comparing against
    the boot-relative clock avoids that (10 ms resolution, the clock tick).
    """
    import psutil

    created = psutil.Process().create_time()
    if sys.platform.startswith("linux") and hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME) - (created - psutil.boot_time())
    return time.time() - created


def profile_steps(
    step: Callable[[], Any], device: torch.device, n_steps: int, trace_dir: Path | None
) -> tuple[list[dict[str, Any]], str | None]:
    """Run ``step`` ``n_steps`` times under torch.profiler; top ops by self time, and the trace path.

    Self time is the device's on GPU (where the kernels run), the CPU's otherwise.
    """
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        if on_gpu:
            torch.cuda.synchronize()
    events = prof.key_averages()

    def self_us(e: Any) -> float:  # microseconds
        return float(e.self_device_time_total if on_gpu else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:TOP_OPS]
    ops = [
        {
            "name": e.key,
            "self_time_ms": self_us(e) / 1000.0,
            "calls": int(e.count),
            "percent": 100.0 * self_us(e) / total,
        }
        for e in top
        if self_us(e) > 0
    ]
    trace_path = None
    if trace_dir is not None:
        trace_dir = Path(trace_dir)
        trace_dir.mkdir(parents=True, exist_ok=True)
        trace_path = str(trace_dir / "trace.json")
        prof.export_chrome_trace(trace_path)
    return ops, trace_path
