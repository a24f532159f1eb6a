"""What the machine is: a hardware/software fingerprint, native precisions and peak FLOP/s.

The fingerprint is taken in a child process (``python -m cotune.hardware``) so the
search process never imports torch or touches an accelerator. Peak FLOP/s come
from one datasheet table for known GPUs, else from a matmul probe cached on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from cotune import __version__

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets, by precision.
# fp32 is the plain (non-TF32) figure, since cotune does not enable TF32.
DATASHEET_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "A10G": {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


# Peak memory bandwidth (bytes/s) from the same datasheets, for memory-bound kernels.
DATASHEET_PEAK_BANDWIDTH: dict[str, float] = {
    "H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12,
    "A10G": 0.6e12, "L40S": 0.864e12, "L4": 0.3e12, "RTX 4090": 1.008e12, "RTX 3090": 0.936e12,
    "V100": 0.9e12, "T4": 0.32e12,
}


def datasheet_bandwidth(gpu_name: str) -> tuple[float, str] | None:
    """The table's bytes/s for a GPU name, longest key first."""
    for key in sorted(DATASHEET_PEAK_BANDWIDTH, key=len, reverse=True):
        if key.lower() in gpu_name.lower():
            return DATASHEET_PEAK_BANDWIDTH[key], f"datasheet: {key}"
    return None


def datasheet_peak(gpu_name: str, precision: str) -> tuple[float, str] | None:
    """The table's figure for a GPU name such as "NVIDIA H100 80GB HBM3", longest key first."""
    for key in sorted(DATASHEET_PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in gpu_name.lower() and precision in DATASHEET_PEAK_FLOPS[key]:
            return DATASHEET_PEAK_FLOPS[key][precision], f"datasheet: {key} {precision}"
    return None


def peak_flops(device: str, precision: str, cache_dir: Path) -> tuple[float, str]:
    """Peak FLOP/s of one device at ``precision``, and where the figure comes from.

    Without a datasheet entry the figure is a matmul probe, cached on disk (a search takes it
    once per study, see :func:`study_peak_flops`). Imports torch: call it from the trial side,
    or through :func:`study_peak_flops`.
    """
    import torch

    if device == "cuda":
        found = datasheet_peak(torch.cuda.get_device_name(), precision)
        if found:
            return found
    path = cache_dir / f"peak-flops-{_probe_key(device, precision)}.json"
    if path.exists():
        return json.loads(path.read_text())["flops"], "matmul probe (cached)"
    flops = _matmul_probe(device, precision)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"flops": flops, "device": device, "precision": precision}))
    tmp.replace(path)
    return flops, "matmul probe"


def _probe_key(device: str, precision: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_model()
    raw = f"{name}|{device}|{precision}|{torch.__version__}|{torch.get_num_threads()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def torch_dtype(precision: str) -> Any:
    """The torch dtype of a precision name (fp32, bf16, fp16). Trial side only: imports torch."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _matmul_probe(device: str, precision: str, n: int = 1024, seconds: float = 0.5) -> float:
    """Best-of FLOP/s of an n x n matmul: a practical ceiling where no datasheet applies."""
    import torch

    dtype = torch_dtype(precision)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b  # first call pays for library initialisation
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def native_precisions(gpus: list[dict[str, Any]], cpu_flags: set[str]) -> dict[str, list[str]]:
    """Precisions each device kind runs natively (not emulated at a fraction of the speed)."""
    cpu = ["fp32"]
    if cpu_flags & {"avx512_bf16", "amx_bf16"}:
        cpu.append("bf16")
    if cpu_flags & {"avx512_fp16", "amx_fp16"}:
        cpu.append("fp16")
    out = {"cpu": cpu}
    if gpus:
        cuda = ["fp32", "fp16"]
        if all(g["capability"][0] >= 8 for g in gpus):  # bf16 tensor cores from Ampere on
            cuda.append("bf16")
        out["cuda"] = cuda
    return out


def _probe() -> dict[str, Any]:
    """Runs in the child process: the only place here that imports torch."""
    import psutil
    import torch

    # Resident memory of a process that has imported torch, before any CUDA initialisation; its
    # anonymous part (Linux: RSS less the file-backed and shared pages, i.e. RssAnon) is the base of
    # a CPU trial's measured peak (cotune.memory adds what a trial imports beyond it).
    rss = psutil.Process().memory_info()
    runtime_rss, runtime_anonymous = rss.rss, (rss.rss - rss.shared if hasattr(rss, "shared") else None)
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"name": p.name, "memory_bytes": p.total_memory, "capability": [p.major, p.minor],
                         # what one Triton program may claim (the opt-in maximum), for the tile rules
                         "shared_memory_bytes": device_shared_memory(p, i)})
    flags = _cpu_flags()
    hardware = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "machine": platform.machine(),
        "cpu_runtime_bytes": runtime_rss,
        "cpu_runtime_anonymous_bytes": runtime_anonymous,
    }
    software = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_driver": _nvidia_driver() if gpus else None,
        "triton": _version("triton"),
        "optuna": _version("optuna"),
        "cotune": __version__,
        "os": platform.platform(),
    }
    return {
        "hardware_id": hardware_id(hardware),
        "hardware": hardware,
        "software": software,
        "native_precisions": native_precisions(gpus, flags),
    }


def shared_memory_bytes(fingerprint: dict[str, Any], device: str) -> int | None:
    """Shared memory per block of the smallest GPU (None on CPU, or if torch does not say)."""
    gpus = fingerprint["hardware"]["gpus"]
    if device != "cuda" or not gpus:
        return None
    sizes = [g.get("shared_memory_bytes") for g in gpus]
    return None if None in sizes else min(sizes)


def device_shared_memory(props: Any, index: int) -> int | None:
    """Shared memory one kernel may claim: torch's opt-in figure, else the one Triton checks against."""
    found = getattr(props, "shared_memory_per_block_optin", None)
    if found:
        return int(found)
    try:
        from triton.runtime import driver

        return int(driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # no triton, or a driver it does not know: the compiler remains the judge
        return None


def hardware_id(hardware: dict[str, Any]) -> str:
    """Short stable hash of what decides speed: CPU model and count, memory, GPU models."""
    keep = {k: hardware[k] for k in ("cpu_model", "cpu_count", "gpu_count", "machine")}
    keep["gpus"] = [g["name"] for g in hardware["gpus"]]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def study_peak_flops(device: str, precisions: list[str], cache_dir: Path,
                     timeout_s: float = 300.0) -> dict[str, dict[str, Any]]:
    """The MFU denominator of a study, per precision: ``{precision: {"flops": F, "source": S}}``.

    Taken once, when the study is created, in a child process (this one stays torch-free),
    and kept in the study, so every trial's MFU divides by the same figure.
    """
    out = subprocess.run(
        [sys.executable, "-m", "cotune.hardware", "--peak-flops", device, ",".join(precisions), str(cache_dir)],
        capture_output=True, text=True, timeout=timeout_s,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peak FLOP/s probe failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def fingerprint(timeout_s: float = 120.0) -> dict[str, Any]:
    """The machine's fingerprint, taken in a child process so this one stays accelerator-free."""
    out = subprocess.run(
        [sys.executable, "-m", "cotune.hardware"], capture_output=True, text=True, timeout=timeout_s
    )
    if out.returncode != 0:
        raise RuntimeError(f"hardware probe failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--peak-flops":  # DEVICE PRECISIONS CACHE_DIR
        device, precisions, cache = sys.argv[2], sys.argv[3].split(","), Path(sys.argv[4])
        peaks = {p: dict(zip(("flops", "source"), peak_flops(device, p, cache), strict=True)) for p in precisions if p}
        json.dump(peaks, sys.stdout)
    else:
        json.dump(_probe(), sys.stdout)
