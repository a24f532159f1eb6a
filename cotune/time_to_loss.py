"""Time to a target loss: the training seconds a config needs to reach a validation loss.

MLPerf's time-to-train idea at the scale of one trial. A trial measures its steady-state step
time (the timed window) and keeps its training-loss curve; its validation loss is taken once,
at the end. The validation curve is estimated as the smoothed training curve shifted by the
gap between the two at the end (so the estimate ends exactly at the measured validation loss),
and the time to the target is the first step where that estimate reaches it, times the mean
step time. A config that never reaches the target within its budget takes ``inf``.

The target is the space's ``loss_target`` or, without one, the baseline's validation loss
(trial 0), kept in the study attrs with its source so every trial is measured against the same.
Nothing here imports torch; the search calls :func:`record_time_to_loss` for each trial it records.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna

from cotune.config import TrialResult
from cotune.errors import UserError

SMOOTHING_SHARE = 0.05  # the trailing mean covers this share of the curve's points (at least one)


def estimated_val_curve(loss_curve: list[list[float]], val_loss: float) -> list[tuple[int, float]]:
    """(step, estimated validation loss) for each point of the training curve ([step, tokens, loss] rows)."""
    if not loss_curve or not math.isfinite(val_loss):
        return []
    steps = [int(p[0]) for p in loss_curve]
    train = np.array([float(p[2]) for p in loss_curve])
    k = max(1, round(SMOOTHING_SHARE * len(train)))
    sums = np.cumsum(np.insert(train, 0, 0.0))
    counts = np.minimum(np.arange(1, len(train) + 1), k)
    smoothed = (sums[1:] - sums[np.arange(1, len(train) + 1) - counts]) / counts  # trailing mean over k points
    gap = val_loss - smoothed[-1]
    return [(s, float(v + gap)) for s, v in zip(steps, smoothed, strict=True)]


def time_to_loss(loss_curve: list[list[float]], val_loss: float, step_time_s: float, target: float) -> tuple[float, int | None]:
    """(seconds, steps) until the estimated validation loss first reaches ``target``; (inf, None) if it never does."""
    for step, loss in estimated_val_curve(loss_curve, val_loss):
        if loss <= target:
            return step * step_time_s, step
    return math.inf, None


def of_result(result: TrialResult, target: float) -> tuple[float, int | None] | None:
    """:func:`time_to_loss` of an ok trial's result (None for one that has no loss or step time)."""
    m = result.metrics
    if result.status != "ok" or "step_time_mean_s" not in m or "val_loss" not in m:
        return None
    return time_to_loss(result.loss_curve, float(m["val_loss"]), float(m["step_time_mean_s"]), target)


def target_of(study_attrs: dict[str, Any]) -> float | None:
    """The study's target loss, if it has one yet."""
    target = study_attrs.get("loss_target")
    return float(target["value"]) if target else None


def check_loss_target(study: optuna.Study, objectives: list[str], space_path: str) -> None:
    """The time_to_loss objective needs a target: the space's, or a baseline that ran or is queued to."""
    if "time_to_loss" not in objectives or target_of(study.user_attrs) is not None:
        return
    baseline = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("baseline")), None)
    if baseline is None:
        raise UserError(f"{space_path}: the time_to_loss objective needs a target loss; set loss_target: in "
                        "the space, or run its baseline: (without --no-baseline) as a new study's first trial")
    if baseline.state.is_finished() and baseline.user_attrs.get("status") != "ok":
        raise UserError(f"{space_path}: the time_to_loss objective has no target: the baseline (trial "
                        f"{baseline.number}) ended {baseline.user_attrs.get('status')}; set loss_target: in the space")


def record_time_to_loss(study: optuna.Study, trial: optuna.Trial, result: TrialResult) -> None:
    """The trial's time to the study's target loss; a baseline that finishes first sets the target."""
    target = target_of(study.user_attrs)
    if target is None and trial.user_attrs.get("baseline") and result.status == "ok":
        target = float(result.metrics["val_loss"])
        study.set_user_attr("loss_target", {"value": target, "source": f"the baseline's (trial {trial.number})"})
    reached = of_result(result, target) if target is not None else None
    if reached is not None:  # without a target the objective is missing, and check_loss_target stops the search
        result.metrics.update(loss_target=target, time_to_loss_s=reached[0], steps_to_loss=reached[1])
