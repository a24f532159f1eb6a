"""Reading and opening cotune studies: storage URLs, trial rows, the Pareto set.

The study is self-describing: each trial's user attrs hold its config, status,
metrics and the machine's fingerprint, so everything here works from the storage
alone (and so do ``optuna.load_study`` and optuna-dashboard).
"""

from __future__ import annotations

import dataclasses
import random
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from cotune.config import STATUSES, TrialConfig
from cotune.errors import UserError
from cotune.space import OBJECTIVES

DEFAULT_STORAGE = "sqlite:///cotune.db"


def shown(url: str) -> str:
    """``url`` as cotune prints it: a password replaced by ``***`` (also where SQLAlchemy cannot parse it)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _without_password(text: str, url: str) -> str:
    """``text`` (a driver's error, say) with ``url``'s password, if it has one, replaced by ``***``."""
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:
        found = re.search(r"://[^:/@]*:([^@]*)@", url)
        password = found.group(1) if found else None
    return text.replace(str(password), "***") if password else text


def check_storage_url(url: str) -> None:
    """Catch a malformed storage URL before anything is created (opening a SQLite URL creates the file)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except Exception as e:
        raise UserError(
            f"--storage {shown(url)!r} is not a database URL Optuna can use ({type(e).__name__}); "
            "use e.g. sqlite:///cotune.db or postgresql://user:password@host/dbname"
        ) from None
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and \
            not Path(db).expanduser().resolve().parent.is_dir():
        raise UserError(f"--storage {shown(url)!r}: the folder {Path(db).parent} does not exist")


def open_storage(url: str, *, dead_after_s: int | None = None) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``; a URL it cannot open is the user's error (the --storage flag).

    With ``dead_after_s`` a search records each running trial's heartbeat (every sixth of it, at least
    1 s), and a trial whose heartbeat is older than that is closed by any worker (cotune.search).
    Once open, a database server that goes away (a restart) is waited for: a new connection is tried
    again for up to ``dead_after_s`` (60 s without), see :func:`_reconnect_for`.
    """
    check_storage_url(url)
    # A server may restart under a long search: a pooled connection is checked before it is used.
    kwargs: dict[str, Any] = {} if url.startswith("sqlite") else {"engine_kwargs": {"pool_pre_ping": True}}
    if dead_after_s is not None:
        kwargs.update(heartbeat_interval=max(1, dead_after_s // 6), grace_period=dead_after_s)
    for attempt in range(_CREATE_TRIES):
        try:
            with warnings.catch_warnings():  # the heartbeat's arguments are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, **kwargs)
            if not url.startswith("sqlite"):
                _reconnect_for(storage.engine, dead_after_s or RECONNECT_S)
            return storage
        except Exception as e:  # sqlalchemy raises many kinds; all mean "cannot open this URL"
            if attempt + 1 < _CREATE_TRIES and _created_meanwhile(e):
                time.sleep(0.2 + random.random())  # another worker is creating the tables: they exist next time
                continue
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--storage {shown(url)!r}: cannot open this database "
                            f"({_without_password(reason, url)})") from None
    raise AssertionError("unreachable")


_CREATE_TRIES = 5


def lost_database(url: str, waited_s: int, e: BaseException) -> str:
    """Why a search stopped when its database stayed away longer than it waits (the trial in hand is not recorded)."""
    cause = e.__cause__ or e
    first = _without_password((str(cause).strip().splitlines() or [type(cause).__name__])[0][:200], url)
    return (f"lost the database {shown(url)} for more than {waited_s} s ({type(cause).__name__}: {first}); every "
            "trial recorded before stays in the study: run the same command again to resume")
RECONNECT_S = 60  # without --dead-after: how long an open storage waits for its server to come back


def _reconnect_for(engine: Any, seconds: float) -> None:
    """Make a connection that cannot be made (the server is restarting) be tried again, every half second,
    for up to ``seconds``. Only connecting is retried: nothing was sent on it yet, so a retry cannot write
    twice. A pooled connection the restart broke is found on checkout (``pool_pre_ping``) and replaced."""
    from sqlalchemy import event

    @event.listens_for(engine, "do_connect")
    def connect(dialect: Any, conn_rec: Any, cargs: Any, cparams: Any) -> Any:
        dbapi = getattr(dialect, "loaded_dbapi", None) or dialect.dbapi
        deadline = time.monotonic() + seconds
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dbapi.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def _created_meanwhile(error: Exception) -> bool:
    """Whether ``error`` says that tables were created by someone else at the same moment (two workers
    starting on a fresh PostgreSQL database: ``UniqueViolation ... pg_type_typname_nsp_index``)."""
    text = f"{type(error).__name__} {error}"
    return any(s in text for s in ("UniqueViolation", "already exists", "duplicate key"))


def study_names(storage: optuna.storages.BaseStorage) -> list[str]:
    return [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage_url: str, name: str | None) -> optuna.Study:
    """Load a study to read by name (without a name, the storage's only study). Reading never creates a
    database: a SQLite file that does not exist is the user's error, not a new empty study."""
    from sqlalchemy.engine import make_url

    check_storage_url(storage_url)
    parsed = make_url(storage_url)
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).expanduser().exists():
        raise UserError(f"--storage {shown(storage_url)!r}: there is no database file {db}; run `cotune search` first "
                        "or point --storage at an existing study")
    storage = open_storage(storage_url)
    names = study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise UserError(f"--storage {shown(storage_url)!r} holds no study yet; run `cotune search` first")
        else:
            raise UserError(f"--storage {shown(storage_url)!r} holds several studies; pick one with --study: {', '.join(names)}")
    if name not in names:
        listed = ", ".join(names) if names else "none"
        raise UserError(f"--study {name!r} is not in {shown(storage_url)} (studies there: {listed})")
    return optuna.load_study(study_name=name, storage=storage)


def objectives_of(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get("objectives", ["tokens_per_second", "val_loss"]))


def counted_trials(study: optuna.Study | list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Trials (of a study, or of a list already read from one) that ended with a cotune status: what the budget
    counts."""
    trials = study if isinstance(study, list) else study.get_trials(deepcopy=False)
    return [t for t in trials if t.user_attrs.get("status") in STATUSES]


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
        key = config_key(trial_knobs(t))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def config_key(knobs: dict[str, Any]) -> str:
    """One string per distinct knob setting: what makes two trials repeats of one config."""
    return repr(sorted(knobs.items()))


def trial_knobs(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's knob values as it ran, by knob name (``TrialConfig.flat``: kernels and world_size too).

    Read from the config the trial recorded, never from ``trial.params`` (Optuna's parameter
    names need not be knob names). A trial that was never built (infeasible before a config
    existed) has only the knob values it was given; one whose config this cotune cannot read has none.
    """
    stored = trial.user_attrs.get("config")
    if not stored:
        return dict(trial.user_attrs.get("knobs") or {})
    try:
        config, _ = config_from_study(stored, trial.number)
    except UserError:
        return {}
    return config.flat()


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
            knobs=trial_knobs(t),
            reason=t.user_attrs.get("reason", ""),
        )
        for t in trials
    ]


def differing_knobs(table: list[Row]) -> list[str]:
    """Knobs that take more than one value across the rows that have them, in the order they first appear.

    A row without a knob (a trial never built has only its sampled knobs) does not make it differ.
    """
    names = list(dict.fromkeys(n for r in table for n in r.knobs))
    return [n for n in names if len({repr(r.knobs[n]) for r in table if n in r.knobs}) > 1]


def objective_value(row: Row, objective: str) -> float | None:
    value = row.metrics.get(OBJECTIVES[objective][0])
    return None if value is None else float(value)
