"""The Pareto set a user picks from, and its knee: one definition for the report and ``cotune export``.

The set is one trial per distinct config (the first to run it) among the study's
Pareto-optimal trials that finished ok; repeats of a config are one choice. The knee is
``analysis.knee`` of their objective values, so the row the report marks as the knee is
the trial ``cotune export --pick knee`` writes. Reads the study only.
"""

from __future__ import annotations

import numpy as np
import optuna

from cotune.report import analysis
from cotune.study import distinct_configs, pareto_trials


def pareto_configs(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's Pareto-optimal trials that finished ok, one per distinct config, by trial number."""
    # A trial another tool told COMPLETE carries no cotune status: Optuna's state stands in, as in the report.
    ok = [t for t in pareto_trials(study) if t.user_attrs.get("status", "ok") == "ok"]
    return distinct_configs(ok)


def knee_trial(
    front: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> optuna.trial.FrozenTrial:
    """The knee of ``front`` (``pareto_configs``) by its told values; ties go to the first, the lower number."""
    if not front:
        raise ValueError("the knee of an empty front is not defined")
    values = np.array([t.values for t in front], dtype=float)
    points = analysis.as_minimised(values, [d.name.lower() for d in directions])
    return front[analysis.knee(points)]
