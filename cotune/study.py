"""Reading and opening cotune studies: storage URLs, trial rows, the Pareto set.

The study is self-describing: each trial's user attrs hold its config, status,
metrics and the machine's fingerprint, so everything here works from the storage
alone (and so do ``optuna.load_study`` and optuna-dashboard).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from cotune.config import STATUSES
from cotune.errors import UserError
from cotune.space import OBJECTIVES

DEFAULT_STORAGE = "sqlite:///cotune.db"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; a URL it cannot open is the user's error (the --storage flag)."""
    if "://" not in url:
        raise UserError(
            f"--storage {url!r} is not a database URL; use e.g. sqlite:///cotune.db or "
            "postgresql://user:password@host/dbname"
        )
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:  # sqlalchemy raises many kinds; all mean "cannot open this URL"
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--storage {url!r}: cannot open this database ({reason})") from None


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load(storage_url: str, name: str | None) -> optuna.Study:
    """Load a study by name; without a name, the storage's only study."""
    storage = open_storage(storage_url)
    names = study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise UserError(f"--storage {storage_url!r} holds no study yet; run `cotune search` first")
        else:
            raise UserError(f"--storage {storage_url!r} holds several studies; pick one with --study: {', '.join(names)}")
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise UserError(f"--study {name!r} is not in {storage_url} (studies there: {listed})")
    return optuna.load_study(study_name=name, storage=storage)


def objectives_of(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives", ["tokens_per_second", "val_loss"]))


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that ended with a cotune status: what the budget counts."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") in STATUSES]


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Optuna's Pareto-optimal trials (the best trial for a single objective)."""
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    return sorted(study.best_trials, key=lambda t: t.number)


def distinct_configs(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """One trial per distinct knob setting (the first one), in order."""
    seen: set[str] = set()
    out = []
    for t in trials:
        key = repr(sorted(_knobs(t).items()))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _knobs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    config = trial.user_attrs.get("config")
    if not config:
        return dict(trial.params)
    out: dict[str, Any] = {}
    for section in ("batch", "parallel", "precision", "optimizer", "software"):
        out.update(config.get(section, {}))
    parallel = config.get("parallel", {})
    out["world_size"] = parallel.get("dp", 1) * parallel.get("fsdp", 1) * parallel.get("tp", 1) * parallel.get("pp", 1)
    return out


@dataclass(frozen=True)
class Row:
    """One trial as the tables show it."""

    number: int
    status: str
    metrics: dict[str, Any]
    knobs: dict[str, Any]
    reason: str


def rows(trials: list[optuna.trial.FrozenTrial]) -> list[Row]:
    return [
        Row(
            number=t.number,
            status=t.user_attrs.get("status", t.state.name.lower()),
            metrics=dict(t.user_attrs.get("metrics", {})),
            knobs=_knobs(t),
            reason=t.user_attrs.get("reason", ""),
        )
        for t in trials
    ]


def differing_knobs(table: list[Row]) -> list[str]:
    """Knobs whose value is not the same in every row, in a stable order."""
    if not table:
        return []
    names = list(table[0].knobs)
    return [n for n in names if len({repr(r.knobs.get(n)) for r in table}) > 1]


def objective_value(row: Row, objective: str) -> float | None:
    value = row.metrics.get(OBJECTIVES[objective][0])
    return None if value is None else float(value)
