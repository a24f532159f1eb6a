"""A search ended from outside: a scheduler's SIGTERM records the running trial as interrupted and exits
cleanly; a SIGKILL takes the trial's whole process tree with it, warm or fresh, one process or torchrun's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from tests.test_workers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

# Two-process trials only, every one long enough to be caught running.
TWO_PROCESSES = (TINY.replace("world_size: {choices: [1, 2]}", "world_size: {choices: [2]}")
                 .replace("token_budget: 16384 ", "token_budget: 262144 ").replace("  world_size: 1\n", "  world_size: 2\n"))


def _search(space: Path, cwd: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cotune.cli", "search", "--space", str(space), "--budget", "3", "--seed", "0",
         "--no-early-stopping", "--no-reuse", *flags],
        cwd=cwd, env={**os.environ, "COLUMNS": "200"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trial_tree(search: subprocess.Popen, within_s: float = 180.0) -> list[psutil.Process]:
    """The processes of the search's running two-process trial once both ranks exist: torchrun (fresh, or
    forked from the fork server) and its two children."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            servers = {p.pid for p in psutil.Process(search.pid).children() if "cotune.forkserver" in p.cmdline()}
            tree = [p for p in psutil.Process(search.pid).children(recursive=True) if p.pid not in servers]
            pids = {p.pid for p in tree}
            ranks = [p for p in tree if p.ppid() in pids]
        except psutil.Error:
            continue  # a process ended while we looked
        if len(ranks) == 2:
            return tree
    raise AssertionError("the search never ran a two-process trial")


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "two.yaml"
    path.write_text(TWO_PROCESSES.replace("name: cpu-tiny-gpt", "name: two"))
    return path


@pytest.mark.parametrize("start", ["warm", "fresh"])
def test_sigkill_of_the_search_takes_the_trial_tree_with_it(space, tmp_path, start):
    search = _search(space, tmp_path, *(["--no-warm-start"] if start == "fresh" else []))
    try:
        tree = _trial_tree(search)
        # Warm: torchrun and its ranks were forked from the fork server, not started by the search itself.
        assert all(p.ppid() != search.pid for p in tree) == (start == "warm")
        search.send_signal(signal.SIGKILL)
        search.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left running: {[p.cmdline()[:6] for p in alive]}"
    finally:
        search.kill()
        search.wait()


def test_sigterm_records_the_running_trial_as_interrupted_and_exits_cleanly(space, tmp_path):
    search = _search(space, tmp_path)
    try:
        tree = _trial_tree(search)
        search.send_signal(signal.SIGTERM)
        out = search.communicate(timeout=60)[0]
    finally:
        search.kill()
    assert search.returncode == 143, out[-3000:]
    assert "terminated (SIGTERM)" in out and "Traceback" not in out, out[-3000:]
    _, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive
    study = optuna.load_study(study_name="two", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    (trial,) = [t for t in study.get_trials() if t.user_attrs.get("status") == "interrupted"]
    assert trial.user_attrs["reason"] == "the search was stopped by SIGTERM while this trial ran"
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
