"""Early stopping on several objectives at once: asynchronous successive halving by Pareto rank.

A trial reports at rungs, fixed shares of the token budget (1/9 and 1/3 by default, with
eta = 3; the last rung is the whole budget). At each rung it carries its measured throughput
and memory (the timed window ended before the first rung) and its loss on a shorter held-out
set. The search keeps it going only if it ranks in the top 1/eta, by non-dominated sorting on
the study's objectives (the rung's loss in place of the final one), of the trials that reached
that rung so far, this one included: MO-ASHA's rule (Schmucker et al., 2021, "Multi-objective
asynchronous successive halving"), here with optimistic ties, so a trial on the same front as
the ones in the top share is never the one stopped. Fewer than eta trials at a rung stop nothing.

Nothing here runs a trial or imports torch: :func:`stop_reason` is a pure function of rung
records, :func:`rung_summary` is what the study keeps of each, and :func:`rung_listener` is
what a search hands the runner to hear a trial's rungs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from cotune.config import json_safe
from cotune.space import OBJECTIVES


@dataclass(frozen=True)
class Halving:
    """The rungs (shares of the token budget, before the whole of it) and the share kept at each (1/eta)."""

    eta: int = 3
    fractions: tuple[float, ...] = (1 / 9, 1 / 3)

    def __post_init__(self) -> None:
        if self.eta < 2:
            raise ValueError(f"eta >= 2 must hold, but got eta={self.eta}")
        if not all(0 < f < 1 for f in self.fractions):
            raise ValueError(f"every rung fraction must lie in (0, 1), but got {self.fractions}")


def rung_summary(record: dict[str, Any], objectives: list[str]) -> dict[str, Any]:
    """What the study keeps of a trial's rung record: where, and each objective's value there."""
    metrics = record.get("metrics", {})
    values = {o: (record["val_loss"] if o == "val_loss" else metrics.get(OBJECTIVES[o][0])) for o in objectives}
    return {"rung": record["rung"], "step": record["step"], "tokens": record["tokens"], **values}


def _as_minimised(summary: dict[str, Any], objectives: list[str]) -> tuple[float, ...] | None:
    """The summary's objective values, each turned so that smaller is better (None if one is missing).
    A value that is not a finite number (a diverging loss) counts as the worst possible."""
    point = []
    for o in objectives:
        v = summary.get(o)
        if v is None:
            return None
        v = float(v)
        v = v if math.isfinite(v) else math.inf
        point.append(-v if OBJECTIVES[o][1] == "maximize" and math.isfinite(v) else v)
    return tuple(point)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and a != b


def front_index(points: list[tuple[float, ...]]) -> list[int]:
    """Non-dominated sorting: each point's front (0 = the Pareto front of ``points``)."""
    fronts = [-1] * len(points)
    left = set(range(len(points)))
    level = 0
    while left:
        front = {i for i in left if not any(_dominates(points[j], points[i]) for j in left if j != i)}
        for i in front:
            fronts[i] = level
        left -= front
        level += 1
    return fronts


def stop_reason(candidate: dict[str, Any], peers: list[dict[str, Any]], objectives: list[str], eta: int) -> str:
    """Why a trial at a rung should stop ('' to go on): it is not in the top 1/eta by Pareto rank.

    ``candidate`` and ``peers`` are :func:`rung_summary` records at the same rung (``peers``: the
    other trials that reached it). The candidate keeps going when fewer than ``eta`` trials
    reached the rung, or when fewer than ceil(n / eta) of the n trials there sit on strictly
    better fronts than it does.
    """
    point = _as_minimised(candidate, objectives)
    if point is None:
        return ""
    if any(math.isinf(v) for v in point):
        return f"stopped at rung {candidate['rung'] + 1}: its loss there is not a finite number"
    others = [p for p in (_as_minimised(s, objectives) for s in peers) if p is not None]
    n = len(others) + 1
    if n < eta:
        return ""
    fronts = front_index([point, *others])
    better = sum(f < fronts[0] for f in fronts[1:])
    kept = math.ceil(n / eta)
    if better < kept:
        return ""
    return (f"stopped at rung {candidate['rung'] + 1} ({candidate['tokens']:,} tokens): {better} of the {n} trials "
            f"that reached it rank on better Pareto fronts, and only the top {kept} (1/{eta}) go on")


def rung_listener(study: optuna.Study, trial: optuna.Trial, objectives: list[str], eta: int) -> Callable[[dict], str]:
    """What hears a running trial's rungs: it records each in the trial (user attr ``rungs``) and says
    why to stop the trial there ('' to go on). The baseline is never stopped: it is the reference.
    (No intermediate values: Optuna's TPE reads them with a single direction, which a study of several
    objectives has not; it ranks pruned trials after the completed ones all the same.)"""
    heard: list[dict[str, Any]] = []
    baseline = bool(trial.user_attrs.get("baseline"))  # an enqueued trial carries its user attrs from the start

    def on_rung(record: dict[str, Any]) -> str:
        summary = rung_summary(record, objectives)
        heard.append(summary)
        trial.set_user_attr("rungs", json_safe(heard))
        if baseline:
            return ""
        peers = [r for t in study.get_trials(deepcopy=False) if t.number != trial.number
                 for r in t.user_attrs.get("rungs") or [] if r["rung"] == summary["rung"]]
        return stop_reason(summary, peers, objectives, eta)

    return on_rung
