"""Workers sharing one study: the exact budget, dead workers, the heartbeat.

Any number of ``cotune search`` processes, on one host or many, may run the same study
through Optuna's RDB storage; nothing else coordinates them. Three rules keep the study
exact:

- **Claims.** Just before a trial starts, its worker marks it ``launched``; it runs only if
  fewer than the budget of the trials numbered below it count (:func:`claim_slot`). Optuna
  numbers trials under a lock on the study, so every lower-numbered trial is visible then.
- **Dead workers.** A worker's running trial beats Optuna's heartbeat (:class:`Heartbeat`);
  any worker closes a trial whose heartbeat is stale, or whose search process is gone on
  this host, as ``interrupted`` and queues its config once more (:func:`fail_stale_trials`).
- **Leaving.** A worker leaves only when the budget is launched and none of it is still
  running (cotune.search.run_search), so a dead worker's retry is always picked up.

Optuna hands a queued trial (the baseline, a retry) to one worker only by reading its state
and changing it under ``SELECT ... FOR UPDATE``; SQLite ignores ``FOR UPDATE``, so two workers
on one SQLite file could both take it. There, taking a queued trial and closing a dead
worker's trial are done one worker at a time under a file lock beside the database
(:func:`one_at_a_time`); PostgreSQL needs none.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import threading
import time
from collections.abc import Iterator

import optuna
from optuna.trial import TrialState

from cotune.config import STATUSES
from cotune.forkserver import alive


def fail_stale_trials(study: optuna.Study) -> int:
    """Close the RUNNING trials of workers that died, as ``interrupted``, and queue each launched one's config
    once more: on this host, a worker whose process is gone (at once); on any host, one whose trial sent no
    heartbeat for the storage's grace period (see :class:`Heartbeat`). Returns how many this worker closed."""
    host = socket.gethostname()
    closed = 0
    storage = study._storage
    beats = getattr(storage, "get_heartbeat_interval", lambda: None)()
    grace = getattr(storage, "_backend", storage).grace_period if beats else _UNCLAIMED_S
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("search_pid")
        if t.user_attrs.get("host") == host and pid and not alive(pid):
            closed += _worker_died(study, t, f"its search (pid {pid} on this host) died while it ran")
        elif pid is None and _age_s(t) > grace:
            # A worker names itself the moment it has asked; one that never did died right after asking (a
            # trial with no heartbeat either, which Optuna's own check passes over).
            closed += _worker_died(study, t, f"its search died right after asking for it ({_age_s(t):.0f} s ago), "
                                             "before it said which it was")
    if beats:
        # What optuna.storages.fail_stale_trials reads, used here to record why before the trial is failed.
        for trial_id in storage._get_stale_trial_ids(study._study_id):
            t = storage.get_trial(trial_id)
            closed += _worker_died(study, t, f"its search (pid {t.user_attrs.get('search_pid', '?')} on "
                                             f"{t.user_attrs.get('host', '?')}) sent no heartbeat for {grace} s: "
                                             "it died, or lost the database")
    return closed


_UNCLAIMED_S = 60.0  # without heartbeats: a trial whose worker has not named itself this long after it was asked


def _age_s(t: optuna.trial.FrozenTrial) -> float:
    """Seconds since ``t`` was asked (Optuna records the asking worker's local time)."""
    return (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0.0


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, taking a queued trial only if no other worker takes it too (:func:`one_at_a_time`)."""
    with one_at_a_time(study):
        return study.ask()


@contextlib.contextmanager
def one_at_a_time(study: optuna.Study) -> Iterator[None]:
    """Hold, on a SQLite study, an exclusive lock shared by every worker of that database file: a
    ``<file>-lock`` file beside it (SQLite's own locks cannot be borrowed: closing any other handle on
    the database drops them). Other storages lock rows themselves, and hold nothing here."""
    url = getattr(getattr(study._storage, "_backend", study._storage), "engine", None)
    url = getattr(url, "url", None)
    if url is None or url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        yield
        return
    fd = os.open(f"{os.path.abspath(os.path.expanduser(url.database))}-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _worker_died(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> bool:
    """Close ``trial``, whose worker died, as interrupted, and queue its config once more if it was launched (a
    retry is not retried again). False if another worker closed it first."""
    with one_at_a_time(study):
        return _close_dead(study, trial, why)


def _close_dead(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> bool:
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, "status", "interrupted")
        storage.set_trial_user_attr(trial._trial_id, "reason", why)
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    attrs = trial.user_attrs
    if attrs.get("launched") and attrs.get("retry_of") is None and trial.params:
        retry = {"retry_of": trial.number, **({"baseline": True} if attrs.get("baseline") else {})}
        study.enqueue_trial(trial.params, user_attrs=retry, skip_if_exists=False)
    return True


class Heartbeat:
    """While a trial is in hand, record its heartbeat in the storage every interval (a thread), if the storage
    has one (``open_storage(url, dead_after_s=...)``); other workers fail the trial when it stops."""

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.storage, self.trial_id = study._storage, trial._trial_id
        get = getattr(self.storage, "get_heartbeat_interval", None)
        self.interval = get() if get is not None else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval:
            self._beat()
            self._thread = threading.Thread(target=self._run, name="cotune-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        try:
            self.storage.record_heartbeat(self.trial_id)
        except Exception:  # the database restarting: the next beat, or the grace period, decides
            pass


class BudgetSpent(Exception):
    """Other workers launched the study's budget while this one held a trial: it is closed, not run."""


_DECIDE_S = 10.0  # how long an earlier trial may take to be launched or recorded before it counts as neither
OTHERS_S = 1.0  # with the budget launched, how often a worker looks at the trials other workers still run


def launched(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Trials that count against the budget: recorded as launched (any status but infeasible), or running and
    claimed (``launched`` set just before its worker started it), whichever worker has them."""
    return sum(_counts(t) is True for t in trials)


def running(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Launched trials still running, on any worker."""
    return sum(t.state == TrialState.RUNNING and _counts(t) is True for t in trials)


def _counts(t: optuna.trial.FrozenTrial) -> bool | None:
    """True: counts against the budget; False: does not; None: undecided (being asked or derived)."""
    status = t.user_attrs.get("status")
    if status is not None:
        return status in STATUSES and status != "infeasible"
    if t.state != TrialState.RUNNING:
        return False  # closed without a status (an older cotune, or by hand)
    return True if t.user_attrs.get("launched") else None


def claim_slot(study: optuna.Study, trial: optuna.Trial, budget: int) -> None:
    """Claim one of the budget's launches for ``trial`` before it starts, or raise :class:`BudgetSpent`.

    Trial numbers are handed out in order under a lock on the study (Optuna's RDB storage), so
    every trial numbered below this one is visible here: it runs only if fewer than ``budget`` of
    those count. Several workers on one study therefore launch exactly ``budget`` trials between
    them. An earlier trial still being derived is waited for (milliseconds), at most ``_DECIDE_S``:
    one whose worker died before deciding never launches.
    """
    trial.set_user_attr("launched", True)
    deadline = time.monotonic() + _DECIDE_S
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        verdicts = [_counts(t) for t in earlier]
        # One undecided for longer than it may take has had its chance (its worker died deciding): not waited for.
        pending = [t for t, v in zip(earlier, verdicts) if v is None and _age_s(t) < _DECIDE_S]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if sum(v is True for v in verdicts) >= budget:
        raise BudgetSpent(f"not run: the study's budget of {budget} launched trials was spent by other workers "
                          "while this one asked")
