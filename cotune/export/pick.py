"""Which trial of a study to export: a point of the Pareto set, or one trial by number.

The Pareto set is the report's (``cotune.report.front``): one trial per distinct config
among the Pareto-optimal trials that finished ok. ``knee`` is its knee, the same trial the
report marks (``analysis.knee``); ``fastest``, ``lowest-loss`` and ``lowest-memory`` take
the point with the most tokens/s, the lowest validation loss and the lowest peak memory.
Ties go to the lower trial number. Reads the study only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from cotune.config import TrialConfig
from cotune.errors import UserError
from cotune.labels import label
from cotune.report.front import knee_trial, pareto_configs
from cotune.study import config_from_study

# pick name: (metric key, direction); knee and trial:N are handled apart.
BY_METRIC: dict[str, tuple[str, str]] = {
    "fastest": ("tokens_per_second", "maximize"),
    "lowest-loss": ("val_loss", "minimize"),
    "lowest-memory": ("peak_memory_bytes", "minimize"),
}
PICKS = ("knee", *BY_METRIC, "trial:N")


@dataclass(frozen=True)
class Picked:
    """The chosen trial and why it was chosen."""

    number: int
    config: TrialConfig
    why: str  # e.g. "the knee of the Pareto set of 11 trials"
    metrics: dict[str, Any]
    filled: list[str]  # config keys the stored config lacked (an older cotune), filled with today's defaults


def pick_trial(study: optuna.Study, how: str) -> Picked:
    """The trial ``how`` names: knee | fastest | lowest-loss | lowest-memory | trial:N."""
    if how.startswith("trial:"):
        return _by_number(study, how)
    if how != "knee" and how not in BY_METRIC:
        raise UserError(f"--pick {how!r} is not a valid choice; use one of {', '.join(PICKS)}")
    front = pareto_configs(study)
    if not front:
        raise UserError(f"study {study.study_name!r} has no trial that finished ok, so there is nothing to export; "
                        "run `cotune search` first")
    if how == "knee":
        chosen = knee_trial(front, study.directions)
        why = f"the knee of the Pareto set of {_configs(len(front))}"
    else:
        key, direction = BY_METRIC[how]
        scored = [t for t in front if _metric(t, key) is not None]
        if not scored:
            raise UserError(f"--pick {how}: no Pareto trial of study {study.study_name!r} recorded {key}")
        sign = -1.0 if direction == "maximize" else 1.0
        chosen = min(scored, key=lambda t: (sign * _metric(t, key), t.number))
        why = f"the {how} point of the Pareto set of {_configs(len(front))} (by {key})"
    return _picked(chosen, why)


def describe(picked: Picked) -> str:
    """One line for the user: which trial, why, and its measured objectives."""
    m = picked.metrics
    parts = []
    if isinstance(m.get("tokens_per_second"), (int, float)):
        parts.append(f"{m['tokens_per_second']:,.0f} {label('tokens_per_second')}")
    if isinstance(m.get("val_loss"), (int, float)):
        parts.append(f"{label('val_loss')} {m['val_loss']:.4f}")
    if isinstance(m.get("peak_memory_bytes"), (int, float)):
        parts.append(f"{label('peak_memory_bytes')} {m['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return f"trial {picked.number}, {picked.why}: " + ", ".join(parts)


def _configs(n: int) -> str:
    return f"{n} config" if n == 1 else f"{n} configs"


def _by_number(study: optuna.Study, how: str) -> Picked:
    text = how[len("trial:"):]
    if not text.isdigit():
        raise UserError(f"--pick {how!r}: N in trial:N must be a trial number, e.g. trial:7")
    number = int(text)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        span = f"numbered 0 to {max(trials)}" if trials else "none yet"
        raise UserError(f"--pick {how}: study {study.study_name!r} has no trial {number} (its trials: {span})")
    trial = trials[number]
    status = trial.user_attrs.get("status", trial.state.name.lower())
    if status != "ok":
        raise UserError(f"--pick {how}: trial {number} ended {status!r}, and only trials that finished ok "
                        "can be exported")
    return _picked(trial, f"as asked (--pick {how})")


def _metric(trial: optuna.trial.FrozenTrial, key: str) -> float | None:
    value = trial.user_attrs.get("metrics", {}).get(key)
    return None if value is None else float(value)


def _picked(trial: optuna.trial.FrozenTrial, why: str) -> Picked:
    stored = trial.user_attrs.get("config")
    if not stored:
        raise UserError(f"trial {trial.number} has no stored config to export")
    config, filled = config_from_study(stored, trial.number)
    return Picked(number=trial.number, config=config, why=why, metrics=dict(trial.user_attrs.get("metrics", {})),
                  filled=filled)
