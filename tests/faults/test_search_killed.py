"""`cotune search` killed with SIGKILL at each step of a trial: right after it asked for the trial (before it
wrote anything of it), after it asked (while it derived the config, before the trial runs), while the trial
runs, and while it records the trial. Nothing it started is left running, the next `cotune search` closes
the trial it held as ``interrupted`` (and runs that config again when it had been launched), and the study
ends with exactly ``--budget`` launched trials, none lost, none twice, none left open.

A step is hit without any hook in cotune: while the trial runs, its model stalls (tests/faults/misbehave.py)
until the test kills the search; at the other steps the search is held by a lock a test takes on Optuna's
PostgreSQL tables, so that its next write waits at exactly that step: ``trial_heartbeats`` and
``trial_user_attributes`` (the first writes of a trial just asked for), ``trial_params`` (the next trial's
first suggested value, written after its search said it holds it and before it is claimed or started), or
``trial_values`` (the objective values, written by ``tell`` once every attribute of the trial's result is).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import psycopg
import pytest
from optuna.trial import TrialState

from tests.faults.conftest import (
    assert_no_process_left,
    assert_ok,
    assert_study_exact,
    descendants,
    fired,
    load_trials,
    run_search,
    sql,
    sqlite_url,
    start_search,
    wait_for,
    write_space,
)
from tests.postgres import binaries

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]
needs_postgres = pytest.mark.skipif(binaries() is None and not os.environ.get("CI"),
                                    reason="needs PostgreSQL: apt-get install -y postgresql")


def _kill(search: subprocess.Popen, folder: Path) -> list[psutil.Process]:
    """SIGKILL ``search`` and check that everything it had started (fork server, trial, ranks) dies with it."""
    tree = descendants(search.pid)
    search.send_signal(signal.SIGKILL)
    search.wait()
    assert_no_process_left(folder, also=tree)
    return tree


def _died(trial, search: subprocess.Popen) -> None:
    assert trial.state == TrialState.FAIL and trial.user_attrs["status"] == "interrupted"
    assert trial.user_attrs["reason"] == f"its search (pid {search.pid} on this host) died while it ran"


def test_sigkill_while_the_trial_runs(folder):
    space = write_space(folder)
    search = start_search(folder, space, 3, fault="stall", trial=1)
    try:
        stalled = wait_for("trial 1 to be running", lambda: (folder / "fault.marker.fired").exists() and fired(folder))
        assert stalled["trial"] == 1
        tree = _kill(search, folder)
        assert stalled["pid"] in {p.pid for p in tree}  # the trial was the search's, and died with it
    finally:
        search.kill()
        search.wait()
    trials = load_trials(sqlite_url(folder))
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert trials[1].user_attrs["launched"] is True
    assert not (folder / "cotune-runs" / "faults" / "trial-0001" / "result.json").exists()

    out = run_search(folder, space, 3).stdout
    assert "closed 1 trial(s) left running by a search that died" in out
    trials = load_trials(sqlite_url(folder))
    assert_study_exact(trials, 3)
    _died(trials[1], search)
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == 1]
    assert retry.params == trials[1].params
    for t in trials:
        if t.number != 1:
            assert_ok(t, folder)
    assert len(trials) == 4
    assert_no_process_left(folder)


def _lock(postgres, database: str, *tables: str) -> psycopg.Connection:
    """A connection holding ``tables`` (reads go on; writes to them wait for it), once the search waits for
    them; roll it back to let go."""
    lock = psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname=database)
    for table in tables:
        lock.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
    wait_for(f"the search to wait for {', '.join(tables)}", lambda: sql(
        postgres, database, "SELECT 1 FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'",
        database))
    return lock


def _held_by(postgres, database: str, table: str, folder: Path):
    """Start a search on ``database`` and hold it at its first write to ``table`` after its first trial was
    launched; returns the search and the connection holding the lock."""
    url = postgres.url(database)
    space = write_space(folder)
    search = start_search(folder, space, 3, "--storage", url)
    wait_for("the first trial to be launched", lambda: sql(
        postgres, database, "SELECT 1 FROM trial_user_attributes WHERE key = 'launched'"))
    return url, space, search, _lock(postgres, database, table)


def _kill_held(search: subprocess.Popen, lock: psycopg.Connection, folder: Path) -> None:
    """SIGKILL the search ``lock`` holds (see :func:`_kill`), then let go of the lock."""
    try:
        _kill(search, folder)
    finally:
        lock.rollback()
        lock.close()
        search.kill()
        search.wait()


@needs_postgres
def test_sigkill_after_the_search_asked_for_a_trial(postgres, folder):
    url, space, search, lock = _held_by(postgres, "after_ask", "trial_params", folder)
    _kill_held(search, lock, folder)
    trials = load_trials(url)
    # Trial 0 ran and was recorded; trial 1 was asked, and its search was deriving its config (no value of it
    # written yet), so it was neither claimed against the budget nor started.
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    asked = trials[1]
    assert asked.user_attrs == {"host": asked.user_attrs["host"], "search_pid": search.pid} and not asked.params
    assert not (folder / "cotune-runs" / "faults" / "trial-0001").exists()

    out = run_search(folder, space, 3, "--storage", url).stdout
    assert "closed 1 trial(s) left running by a search that died" in out
    trials = load_trials(url)
    assert_study_exact(trials, 3)
    _died(trials[1], search)
    assert not any(t.user_attrs.get("retry_of") is not None for t in trials)  # it never ran: nothing to retry
    assert [t.number for t in trials if t.user_attrs["status"] == "ok"] == [0, 2, 3]
    for t in trials:
        if t.number != 1:
            assert_ok(t, folder)
    assert_no_process_left(folder)


@needs_postgres
def test_sigkill_while_the_search_records_a_trial(postgres, folder):
    url, space, search, lock = _held_by(postgres, "recording", "trial_values", folder)
    _kill_held(search, lock, folder)
    trials = load_trials(url)
    # The trial ran whole and its result's attributes were stored; its values were being told.
    (held,) = [t for t in trials if t.state == TrialState.RUNNING]
    assert held.user_attrs["status"] == "ok" and held.user_attrs["metrics"]["tokens_per_second"] > 0
    assert (folder / "cotune-runs" / "faults" / f"trial-{held.number:04d}" / "result.json").is_file()
    assert all(t.state == TrialState.COMPLETE for t in trials if t is not held)

    out = run_search(folder, space, 3, "--storage", url).stdout
    assert "closed 1 trial(s) left running by a search that died" in out
    trials = load_trials(url)
    assert_study_exact(trials, 3)
    _died(trials[held.number], search)
    (retry,) = [t for t in trials if t.user_attrs.get("retry_of") == held.number]
    assert retry.params == held.params
    for t in trials:
        if t.number != held.number:
            assert_ok(t, folder)
    assert_no_process_left(folder)


@needs_postgres
def test_sigkill_right_after_ask_before_the_search_marks_the_trial_as_its_own(postgres, folder):
    # Held at trial 0's values, then, with its search's first writes of the next trial held too, let go:
    # the search tells trial 0, asks for trial 1 and waits to beat its heartbeat.
    url, space, search, values = _held_by(postgres, "right_after_ask", "trial_values", folder)
    first_writes = psycopg.connect(host="127.0.0.1", port=postgres.port, user="postgres", dbname="right_after_ask")
    try:
        first_writes.execute("LOCK TABLE trial_heartbeats IN EXCLUSIVE MODE")
        first_writes.execute("LOCK TABLE trial_user_attributes IN EXCLUSIVE MODE")
        values.rollback()
        wait_for("trial 1 to be asked", lambda: sql(
            postgres, "right_after_ask", "SELECT 1 FROM trials t WHERE number = 1 AND EXISTS (SELECT 1 FROM "
            "pg_stat_activity WHERE datname = 'right_after_ask' AND wait_event_type = 'Lock')"))
        _kill(search, folder)
    finally:
        for lock in (values, first_writes):
            lock.rollback()
            lock.close()
        search.kill()
        search.wait()
    trials = load_trials(url)
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING]
    assert trials[1].user_attrs == {} and not sql(
        postgres, "right_after_ask", "SELECT 1 FROM trial_heartbeats h JOIN trials t USING (trial_id) WHERE number = 1")

    # The search that held trial 1 is gone, and it never launched it. (--dead-after 5: a trial whose heartbeat,
    # had it one, stopped 5 s ago is dead too.)
    run_search(folder, space, 3, "--storage", url, "--dead-after", "5")
    trials = load_trials(url)
    assert_study_exact(trials, 3)
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["status"] == "interrupted"
    assert [t.number for t in trials if t.user_attrs["status"] == "ok"] == [0, 2, 3]
    assert_no_process_left(folder)
