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

from cotune.space import OBJECTIVES
from cotune.study import trial_knobs

# Metrics a trial records that the report reads; any may be missing (NaN).
METRIC_COLUMNS = (
    "tokens_per_second", "val_loss", "peak_memory_bytes", "mfu", "step_time_mean_s", "step_time_std_s",
    "flops_per_token", "tokens_trained", "train_steps", "fp16_skipped_steps", "rung_val_loss",
    "time_to_loss_s",
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
    values, as recorded), ``effective`` (the knob values the trial ran, after derivation, e.g.
    ``grad_accum_steps``: ``cotune.study.trial_knobs``), ``config``, ``loss_curve``, ``phase_seconds``,
    ``profile_top_ops``, ``kernel_timings``, ``measured``, ``reason``, ``error_tail``, ``hardware_id``, ``started``,
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
            knobs=dict(a.get("knobs") or {}),
            # As `cotune best` and `cotune trials` show them; a trial never built has its sampled knobs only.
            effective=trial_knobs(t),
            config=a.get("config"),
            loss_curve=list(a.get("loss_curve") or []),
            phase_seconds=dict(a.get("phase_seconds") or {}),
            profile_top_ops=list(a.get("profile_top_ops") or []),
            kernel_timings=list(a.get("kernel_timings") or []),
            # Where its throughput and its loss were measured, when not all in its own run (cotune.factorise).
            measured=dict(a.get("measured") or {}),
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
               "phase_seconds", "profile_top_ops", "kernel_timings", "measured", "reason", "error_tail", "hardware_id", "peak_flops_source",
               "peak_memory_source", "started", "duration_s"]
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.set_index("number", drop=False)


def config_sections(config: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The tunable sections of a TrialConfig dict (what a hover or a details box shows)."""
    if not isinstance(config, dict):
        return {}
    return {s: dict(config[s]) for s in CONFIG_SECTIONS if s in config}

