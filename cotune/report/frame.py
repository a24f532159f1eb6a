"""One row per trial: the pandas DataFrame every part of the report is computed from.

Only the study's storage is read (user attrs written by ``cotune.search.record``), so
a study from another machine, or one that lacks some attrs, still makes a frame:
what was not recorded is NaN or empty.
"""

from __future__ import annotations

import math
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from cotune.config import KERNELS
from cotune.space import OBJECTIVES

# Metrics a trial records that the report reads; any may be missing (NaN).
METRIC_COLUMNS = (
    "tokens_per_second", "val_loss", "peak_memory_bytes", "mfu", "step_time_mean_s", "step_time_std_s",
    "flops_per_token", "tokens_trained", "train_steps", "fp16_skipped_steps",
)
# The TrialConfig sections whose values a user tunes (workload and run are fixed per study).
CONFIG_SECTIONS = ("batch", "parallel", "precision", "optimizer", "software", "kernels")


def _status(t: optuna.trial.FrozenTrial) -> str:
    status = t.user_attrs.get("status")
    if status:
        return str(status)
    # A study written by something else than cotune: Optuna's own states stand in.
    return {TrialState.COMPLETE: "ok", TrialState.FAIL: "crash"}.get(t.state, t.state.name.lower())


def _number(value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial of ``study``, by number.

    Columns: ``number``, ``status``, ``ok`` (told with objective values), the
    ``METRIC_COLUMNS`` (floats, NaN when not recorded), ``knobs`` (the sampled knob
    values), ``effective`` (the knob values the trial ran, after derivation, e.g.
    ``grad_accum_steps``), ``config``, ``loss_curve``, ``phase_seconds``,
    ``profile_top_ops``, ``kernel_timings``, ``reason``, ``error_tail``, ``hardware_id``, ``started``,
    ``duration_s``, ``peak_flops_source``, ``peak_memory_source``.
    """
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    records = []
    for t in trials:
        a = t.user_attrs
        metrics = a.get("metrics") or {}
        record: dict[str, Any] = {
            "number": t.number,
            "status": _status(t),
            "ok": t.state == TrialState.COMPLETE and _status(t) == "ok",
        }
        for name in METRIC_COLUMNS:
            record[name] = _number(metrics.get(name))
        if t.state == TrialState.COMPLETE and t.values is not None:
            # The told values are the truth for the objectives (a plain Optuna study has no metrics).
            for objective, value in zip(study.user_attrs.get("objectives", []), t.values):
                record[OBJECTIVES[objective][0]] = float(value)
        record.update(
            knobs=dict(a.get("knobs") or t.params),
            # A trial that was never built has no config: its sampled knobs are all there is.
            effective=flat_knobs(a["config"]) if a.get("config") else dict(a.get("knobs") or t.params),
            config=a.get("config"),
            loss_curve=list(a.get("loss_curve") or []),
            phase_seconds=dict(a.get("phase_seconds") or {}),
            profile_top_ops=list(a.get("profile_top_ops") or []),
            kernel_timings=list(a.get("kernel_timings") or []),
            reason=str(a.get("reason") or ""),
            error_tail=str(a.get("error_tail") or ""),
            hardware_id=(a.get("fingerprint") or {}).get("hardware_id"),
            peak_flops_source=metrics.get("peak_flops_source"),
            peak_memory_source=metrics.get("peak_memory_source"),
            started=t.datetime_start,
            duration_s=t.duration.total_seconds() if t.duration is not None else math.nan,
        )
        records.append(record)
    columns = ["number", "status", "ok", *METRIC_COLUMNS, "knobs", "effective", "config", "loss_curve",
               "phase_seconds", "profile_top_ops", "kernel_timings", "reason", "error_tail", "hardware_id", "peak_flops_source",
               "peak_memory_source", "started", "duration_s"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.set_index("number", drop=False)


def config_sections(config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The tunable sections of a TrialConfig dict (what a hover or a details box shows)."""
    if not isinstance(config, dict):
        return {}
    return {s: dict(config[s]) for s in CONFIG_SECTIONS if s in config}


def flat_knobs(config: dict[str, Any]) -> dict[str, Any]:
    """A TrialConfig dict's knob values as run, in one mapping, with the world size they multiply to.

    Read from the dict rather than ``TrialConfig.from_dict``, so a config recorded by an
    older cotune (with fewer fields) still reads.
    """
    out: dict[str, Any] = {}
    for section, values in config_sections(config).items():
        if section == "kernels":  # the kernel choices by their knob names (mlp -> mlp_kernel), as TrialConfig.flat
            values = {f"{k}_kernel" if k in KERNELS else k: v for k, v in values.items()}
        out.update(values)
    p = config.get("parallel") or {}
    out["world_size"] = p.get("dp", 1) * p.get("fsdp", 1) * p.get("tp", 1) * p.get("pp", 1)
    return out
