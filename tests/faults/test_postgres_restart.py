"""PostgreSQL restarts under a search of three `cotune search` workers sharing one study.

While every worker's trial runs, a restart goes unnoticed: the pooled connections are checked before use
(``pool_pre_ping``) and a heartbeat that fails meanwhile is only skipped, so each worker records its trial and
goes on. When the database is away while workers use it, a worker may lose its connection: it must then
stop cleanly (a message, no traceback), and whatever it held is closed by the others or by the next search,
which ends the study with exactly ``--budget`` launched trials, no config twice, nothing left running.

The server is restarted with ``pg_ctl stop`` then ``start`` (tests/postgres.py), each of which waits.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from optuna.trial import TrialState

from tests.faults.conftest import (
    assert_no_process_left,
    assert_ok,
    assert_study_exact,
    load_trials,
    run_search,
    search_argv,
    search_env,
    sql,
    wait_for,
    write_space,
)
from tests.postgres import PASSWORD, binaries

pytestmark = [
    pytest.mark.slow,
    pytest.mark.multiprocess,
    pytest.mark.skipif(binaries() is None and not os.environ.get("CI"),
                       reason="needs PostgreSQL: apt-get install -y postgresql"),
]

WORKERS = 3


def _workers(folder, space, url: str, budget: int, fault: str = "") -> list[subprocess.Popen]:
    env = search_env(folder, fault)
    return [subprocess.Popen(search_argv(space, budget, "--storage", url), cwd=folder, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(WORKERS)]


def _restart(postgres, down_s: float) -> None:
    postgres.stop()
    time.sleep(down_s)
    postgres.start()


def test_a_restart_while_every_worker_runs_a_trial_goes_unnoticed(postgres, folder):
    url = postgres.url("restart_in_trials")
    space = write_space(folder)
    workers = _workers(folder, space, url, WORKERS, fault="gate")  # every trial waits at the gate
    try:
        # Each worker claimed one trial of the budget, which waits: none of them uses the database until then.
        wait_for("every worker's trial to wait at the gate",
                 lambda: len(list(folder.glob("fault.marker.arrived.*"))) == WORKERS)
        _restart(postgres, down_s=1.0)
        (folder / "fault.marker.open").touch()
        outs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    for w, out in zip(workers, outs):
        assert w.returncode == 0 and "Traceback" not in out, out[-3000:]
        assert PASSWORD not in out
    trials = load_trials(url)
    assert_study_exact(trials, WORKERS)
    assert len(trials) == WORKERS and len({t.user_attrs["search_pid"] for t in trials}) == WORKERS
    for t in trials:
        assert_ok(t, folder)
    assert_no_process_left(folder)


def test_a_restart_while_the_workers_use_the_database(postgres, folder):
    url = postgres.url("restart_in_use")
    space = write_space(folder)
    budget = 6 * WORKERS
    workers = _workers(folder, space, url, budget)
    try:
        # Every worker recorded a trial, so it is in its loop of asking, running (a few milliseconds) and
        # recording trials: each uses the database several times a second.
        wait_for("every worker to have recorded a trial", lambda: (sql(
            postgres, "restart_in_use", "SELECT count(DISTINCT a.value_json) FROM trials t JOIN "
            "trial_user_attributes a USING (trial_id) WHERE t.state = 'COMPLETE' AND a.key = 'search_pid'")
            or [(0,)])[0][0] == WORKERS)
        _restart(postgres, down_s=2.0)
        outs = [w.communicate(timeout=300)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    assert_no_process_left(folder)
    assert not any(PASSWORD in out for out in outs)
    # Each worker survived, or stopped cleanly: a message saying the database went away, no traceback.
    unclean = [f"worker {i} (exit code {w.returncode}): {out.strip().splitlines()[-1][:300]}"
               for i, (w, out) in enumerate(zip(workers, outs))
               if w.returncode != 0 and ("Traceback" in out or "database" not in out.lower())]

    # Whatever a worker that stopped held is closed by the next search, which completes the budget. (--dead-after
    # 5: a trial whose worker died before it wrote its pid is closed once its heartbeat is 5 s old, not 60 s.)
    run_search(folder, space, budget, "--storage", url, "--dead-after", "5")
    trials = load_trials(url)
    assert_study_exact(trials, budget)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:
        if t.user_attrs["status"] != "interrupted":
            assert_ok(t, folder)
    assert_no_process_left(folder)
    assert not unclean, f"{len(unclean)} of {WORKERS} workers died with a traceback when the database went " \
                        "away for 2 s:\n" + "\n".join(unclean)
