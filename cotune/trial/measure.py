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


def peak_memory(device: torch.device, host: HostMemory | None = None) -> dict[str, int | str]:
    """This process's peak memory as trial metrics: ``peak_memory_bytes``, and ``peak_memory_source``
    saying what it is.

    GPU: the caching allocator's peak of allocated bytes, and of reserved bytes
    (``peak_memory_reserved_bytes``: what the allocator held from the driver, fragmentation
    included). CPU: the anonymous peak ``host`` kept (see :class:`HostMemory`; it takes a last
    checkpoint here), and the whole resident set's peak beside it (``peak_rss_bytes``: file-backed
    pages included); where no anonymous peak can be had, the resident set's peak, so labelled.
    """
    if device.type == "cuda":
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)),
            "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
            "peak_memory_source": "cuda allocator peak",
        }
    if host is not None and host.resettable:
        host.checkpoint()
        return {"peak_memory_bytes": host.anonymous_peak, "peak_rss_bytes": host.rss_peak,
                "peak_memory_source": ANONYMOUS_PEAK_SOURCE}
    status = _proc_status()
    if status is not None:
        rss = status["VmHWM"]
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss = int(rss if sys.platform == "darwin" else rss * 1024)
    return {"peak_memory_bytes": rss, "peak_rss_bytes": rss,
            "peak_memory_source": "process peak RSS (file-backed pages included: the anonymous peak needs "
                                  "Linux's /proc/self/clear_refs)"}


ANONYMOUS_PEAK_SOURCE = ("anonymous peak (VmHWM less file-backed and shared pages; the mark reset after the "
                         "data is mapped and between untimed steps)")


class HostMemory:
    """The peak of this process's anonymous memory (heap, tensors, stacks: what the model needs) on Linux.

    Linux keeps a peak of the whole resident set only (VmHWM), which also counts file-backed
    pages: the shared libraries' code and every page of the memory-mapped corpus a batch
    touched (with large page-cache folios up to 2 MiB per window read, so a bigger corpus would
    look like a bigger model). ``RssAnon`` is the current value only. So the mark is reset
    (``/proc/self/clear_refs`` "5", Linux 4.0+) when the data is mapped and at every
    :meth:`checkpoint`, where the interval's VmHWM less the file-backed and shared (tmpfs)
    pages resident at its end is taken. That is the anonymous peak of the interval, or below it
    by the file pages mapped after that peak within the interval (they are counted in the
    end's figure but were not resident at the peak): never above it. The train loop checkpoints
    after every step that no timed step follows; a step reads its batch's windows before it
    computes anything, so only library code loaded lazily late in a step can fall after its
    peak. Nothing runs inside the timed window, which is one interval (with the warm-up step
    before it). Outside Linux ``resettable`` is False.

    ``rss_peak`` is the whole resident set's peak over the process's life (VmHWM before the
    first reset, and of every interval since), the figure the anonymous peak replaces.
    """

    def __init__(self) -> None:
        self.anonymous_peak = 0  # bytes
        self.rss_peak = 0  # bytes
        status = _proc_status()
        self.resettable = status is not None and _reset_peak_rss()
        if status is not None:
            self.rss_peak = status["VmHWM"]
            self.anonymous_peak = _anonymous(status, "VmRSS")  # now, at the reset

    def checkpoint(self) -> None:
        """Fold the interval since the last reset into the peaks, and reset the mark for the next one."""
        if not self.resettable:
            return
        status = _proc_status()
        if status is None:
            return
        self.rss_peak = max(self.rss_peak, status["VmHWM"])
        self.anonymous_peak = max(self.anonymous_peak, _anonymous(status, "VmHWM"))
        _reset_peak_rss()


_STATUS_FIELDS = ("VmHWM", "VmRSS", "RssFile", "RssShmem")


def _proc_status() -> dict[str, int] | None:
    """VmHWM, VmRSS, RssFile and RssShmem of this process in bytes, read at once from /proc (Linux), or None.

    Its own figures: getrusage's ru_maxrss is not VmHWM, as Linux carries the launching process's
    peak across fork and exec, so a trial started by a larger process would report the parent's.
    """
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in _STATUS_FIELDS:
            out[name] = int(value.split()[0]) * 1024  # kB
    return out if len(out) == len(_STATUS_FIELDS) else None


def _anonymous(status: dict[str, int], resident: str) -> int:
    """``status[resident]`` (VmRSS or VmHWM) less the file-backed and shared (tmpfs) pages resident now."""
    return status[resident] - status["RssFile"] - status["RssShmem"]


def _reset_peak_rss() -> bool:
    """Set this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` means the device or host ran out of memory."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    # torch's CPU allocator raises a plain RuntimeError: "DefaultCPUAllocator: can't allocate memory: you tried to
    # allocate N bytes" (older releases: "not enough memory").
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "DefaultCPUAllocator: can't allocate" in text
                                            or "DefaultCPUAllocator: not enough memory" in text)


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
