"""The Triton kernel timings a study's trials recorded, one row per distinct measurement.

Each trial that ran a kernel in Triton times it alone at its shapes beside the PyTorch op
it replaces (``cotune.trial.kernels.timing``); trials with the same kernel, shape, dtype,
tiles and device share one cached figure, so this table lists each figure once with the
trials that used it.
"""

from __future__ import annotations

import json

import pandas as pd

COLUMNS = ["kernel", "shape", "dtype", "tiles", "device", "triton_ms", "torch_ms", "speedup", "timer", "trials"]


def kernel_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Distinct kernel timings in ``frame`` (see ``trials_frame``), fastest relative to PyTorch first.

    ``speedup`` is PyTorch's time over Triton's (above 1: the kernel is faster). Empty when
    no trial ran a Triton kernel.
    """
    rows: dict[str, dict] = {}
    for number, timings in frame["kernel_timings"].items():
        for t in timings:
            key = json.dumps({k: t.get(k) for k in ("kernel", "shape", "dtype", "tiles", "device", "triton", "torch")},
                             sort_keys=True)
            row = rows.setdefault(key, {
                "kernel": t.get("kernel"), "shape": _shape(t.get("shape")), "dtype": t.get("dtype"),
                "tiles": _shape(t.get("tiles")), "device": t.get("device"), "triton_ms": float(t["triton_ms"]),
                "torch_ms": float(t["torch_ms"]), "speedup": float(t["torch_ms"]) / float(t["triton_ms"]),
                "timer": t.get("timer"), "trials": []})
            row["trials"].append(int(number))
    out = pd.DataFrame(list(rows.values()), columns=COLUMNS)
    return out.sort_values(["kernel", "speedup"], ascending=[True, False], ignore_index=True)


def _shape(values: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (values or {}).items())
