"""Time to a target loss: the training seconds a config needs to reach a validation loss.

MLPerf's time-to-train idea at the scale of one trial. A trial measures its steady-state step
time (the timed window) and keeps its training-loss curve; its validation loss is taken once,
at the end. The validation curve is estimated as the smoothed training curve shifted by the
gap between the two at the end (so the estimate ends exactly at the measured validation loss),
and the time to the target is the first step where that estimate reaches it, times the mean
step time. A config that never reaches the target within its budget takes ``inf``.

The target is the space's ``loss_target`` or, without one, the baseline's validation loss
(trial 0), kept in the study attrs with its source so every trial is measured against the same.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

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


def target_of(study_attrs: dict[str, Any]) -> float | None:
    """The study's target loss, if it has one yet."""
    target = study_attrs.get("loss_target")
    return float(target["value"]) if target else None
