"""Which trial of a study to export: a point of the Pareto set, or one trial by number.

``knee`` is the Pareto point closest to the ideal once each objective is normalised
to [0, 1] over the Pareto set (0 = the best value any Pareto point reaches);
``fastest``, ``lowest-loss`` and ``lowest-memory`` take the Pareto point with the most
tokens/s, the lowest validation loss and the lowest peak memory. Ties go to the
lower trial number. Reads the study only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from cotune.config import TrialConfig
from cotune.errors import UserError
from cotune.study import load, pareto_trials

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


def open_study(storage_url: str, name: str | None) -> optuna.Study:
    """Load the study to export from; a SQLite file that does not exist is an error, never created."""
    if storage_url.startswith("sqlite:///"):
        path = Path(storage_url[len("sqlite:///"):]).expanduser()
        if str(path) != ":memory:" and not path.is_file():
            raise UserError(f"--storage {storage_url!r}: no such database file {path}")
    return load(storage_url, name)


def pick_trial(study: optuna.Study, how: str) -> Picked:
    """The trial ``how`` names: knee | fastest | lowest-loss | lowest-memory | trial:N."""
    if how.startswith("trial:"):
        return _by_number(study, how)
    if how != "knee" and how not in BY_METRIC:
        raise UserError(f"--pick {how!r} is not a valid choice; use one of {', '.join(PICKS)}")
    front = [t for t in pareto_trials(study) if t.user_attrs.get("status") == "ok"]
    if not front:
        raise UserError(f"study {study.study_name!r} has no trial that finished ok, so there is nothing to export; "
                        "run `cotune search` first")
    if how == "knee":
        chosen = _knee(front, study.directions)
        why = f"the knee of the Pareto set of {_trials(len(front))}"
    else:
        key, direction = BY_METRIC[how]
        scored = [t for t in front if _metric(t, key) is not None]
        if not scored:
            raise UserError(f"--pick {how}: no Pareto trial of study {study.study_name!r} recorded {key}")
        sign = -1.0 if direction == "maximize" else 1.0
        chosen = min(scored, key=lambda t: (sign * _metric(t, key), t.number))
        why = f"the {how} point of the Pareto set of {_trials(len(front))} (by {key})"
    return _picked(chosen, why)


def describe(picked: Picked) -> str:
    """One line for the user: which trial, why, and its measured objectives."""
    m = picked.metrics
    parts = []
    if isinstance(m.get("tokens_per_second"), (int, float)):
        parts.append(f"{m['tokens_per_second']:,.0f} tokens/s")
    if isinstance(m.get("val_loss"), (int, float)):
        parts.append(f"val_loss {m['val_loss']:.4f}")
    if isinstance(m.get("peak_memory_bytes"), (int, float)):
        parts.append(f"peak memory {m['peak_memory_bytes'] / 2**20:,.0f} MiB")
    return f"trial {picked.number}, {picked.why}: " + ", ".join(parts)


def _trials(n: int) -> str:
    return f"{n} trial" if n == 1 else f"{n} trials"


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


def _knee(
    front: list[optuna.trial.FrozenTrial], directions: list[optuna.study.StudyDirection]
) -> optuna.trial.FrozenTrial:
    """The Pareto point nearest the ideal, each objective scaled to [0, 1] over the front (0 = best)."""
    columns = list(zip(*(t.values for t in front)))

    def badness(values: list[float]) -> float:
        total = 0.0
        for value, column, direction in zip(values, columns, directions):
            low, high = min(column), max(column)
            if high == low:
                continue  # every point is as good here: the objective does not separate them
            share = (value - low) / (high - low)
            total += (1.0 - share if direction == optuna.study.StudyDirection.MAXIMIZE else share) ** 2
        return math.sqrt(total)

    return min(front, key=lambda t: (badness(t.values), t.number))


def _picked(trial: optuna.trial.FrozenTrial, why: str) -> Picked:
    stored = trial.user_attrs.get("config")
    if not stored:
        raise UserError(f"trial {trial.number} has no stored config to export")
    config, filled = config_from_study(stored, trial.number)
    return Picked(number=trial.number, config=config, why=why, metrics=dict(trial.user_attrs.get("metrics", {})),
                  filled=filled)


def config_from_study(stored: dict[str, Any], number: int) -> tuple[TrialConfig, list[str]]:
    """A trial's stored config; keys an older cotune did not write yet take today's defaults (and are listed)."""
    data = {section: dict(values) if isinstance(values, dict) else values for section, values in stored.items()}
    filled: list[str] = []
    defaults = TrialConfig()
    for field in dataclasses.fields(TrialConfig):
        section = data.get(field.name)
        if section is None:  # a whole section an older cotune did not have (kernels: all torch)
            data[field.name] = dataclasses.asdict(getattr(defaults, field.name))
            filled.append(field.name)
            continue
        if not isinstance(section, dict):
            continue  # from_dict reports it
        for name, value in dataclasses.asdict(getattr(defaults, field.name)).items():
            if name not in section:
                section[name] = value
                filled.append(f"{field.name}.{name}")
    try:
        return TrialConfig.from_dict(data), filled
    except (ValueError, TypeError) as e:
        raise UserError(f"trial {number}: its stored config does not fit this version of cotune ({e})") from None
