"""What the fault-injection tests share: the misbehaving model's space, real `cotune search` runs, the study's
trials as the budget sees them, and the processes a search may have left behind.

Every search here is the real command line (``python -m cotune.cli search``) in its own process, its working
folder a test's temporary folder, on a real Optuna storage. Its trials train the built-in GPT through
``tests.faults.misbehave:build`` (README "Your own model"), which misbehaves in one trial of the search as
``COTUNE_FAULT`` says. Trials are a few milliseconds of training each, so a search costs its start-up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest

from cotune import workers
from cotune.study import counted_trials
from tests.faults.misbehave import FAULT_ENV, MARKER_ENV, TRIAL_ENV
from tests.postgres import Server

# One or two processes, one layer of width 32 over 32 tokens: 4-8 optimizer steps of a few milliseconds.
SPACE = """\
name: faults
hardware: {{device: cpu, nproc: 2}}
workload: {{model: "tests.faults.misbehave:build", n_layer: 1, n_embd: 32, n_head: 2, seq_len: 32}}
trial: {{warmup_steps: 1, measured_steps: 2, token_budget: 2048, eval_tokens: 512, timeout_s: {timeout_s}}}
objectives: [tokens_per_second, val_loss]
knobs:
  micro_batch_size: {{choices: [4, 8]}}
  global_batch_size: {{choices: [8, 16]}}
  learning_rate: {{low: 1.0e-3, high: 1.0e-2, log: true}}
  world_size: {{choices: [{world_size}]}}
baseline: {{micro_batch_size: 8, global_batch_size: 16, learning_rate: 3.0e-3, world_size: {world_size}}}
"""
STUDY = "faults"
FLAGS = ("--seed", "0", "--no-early-stopping", "--no-reuse")


def write_space(folder: Path, *, world_size: int = 1, timeout_s: float = 60) -> Path:
    path = folder / "faults.yaml"
    path.write_text(SPACE.format(world_size=world_size, timeout_s=timeout_s))
    return path


def search_env(folder: Path, fault: str = "", trial: int | None = None) -> dict[str, str]:
    """The environment of a search whose trials misbehave as ``fault`` says ('' for none), once (in trial number
    ``trial``, if given): the marker file is created here and removed by the trial process that fires.

    One thread per trial process: with two cores shared by the search, its trials and whatever else runs,
    OpenMP's spinning threads make a step of this tiny model take a second instead of milliseconds.
    """
    marker = folder / "fault.marker"
    if fault:
        marker.write_text(fault)
    return {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1", FAULT_ENV: fault, MARKER_ENV: str(marker),
            **({TRIAL_ENV: str(trial)} if trial is not None else {})}


def search_argv(space: Path, budget: int, *flags: str) -> list[str]:
    return [sys.executable, "-m", "cotune.cli", "search", "--space", str(space), "--study", STUDY,
            "--budget", str(budget), *FLAGS, *flags]


def run_search(folder: Path, space: Path, budget: int, *flags: str, fault: str = "",
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``cotune search`` run to its end in ``folder``; it must exit 0 (a failed trial is data, never an error)."""
    done = subprocess.run(search_argv(space, budget, *flags), cwd=folder, env=search_env(folder, fault),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"cotune search exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def start_search(folder: Path, space: Path, budget: int, *flags: str, fault: str = "",
                 trial: int | None = None) -> subprocess.Popen:
    return subprocess.Popen(search_argv(space, budget, *flags), cwd=folder, env=search_env(folder, fault, trial),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'cotune.db'}"


def load_trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return sorted(optuna.load_study(study_name=STUDY, storage=storage).get_trials(), key=lambda t: t.number)


def fired(folder: Path) -> dict:
    """What the trial process that fired wrote: its pid and its result path (so its trial's number)."""
    record = json.loads((folder / "fault.marker.fired").read_text())
    assert not (folder / "fault.marker").exists()
    record["trial"] = int(Path(record["result"]).parent.name.removeprefix("trial-"))
    return record


def assert_study_exact(trials: list[optuna.trial.FrozenTrial], budget: int) -> None:
    """Every trial is accounted for: numbered 0..n-1, none left running or queued, exactly ``budget`` of them
    count as launched, and no config ran twice except as the one retry of a trial whose search died."""
    from optuna.trial import TrialState

    assert [t.number for t in trials] == list(range(len(trials)))
    left = [(t.number, t.state.name) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not left, f"trials left open: {left}"
    assert all("status" in t.user_attrs for t in trials), [(t.number, t.user_attrs) for t in trials]
    assert workers.launched(trials) == budget, [(t.number, t.user_attrs.get("status")) for t in trials]
    launched = [t for t in counted_trials(trials) if t.user_attrs["status"] != "infeasible"]
    assert len(launched) == budget
    retried = {t.user_attrs["retry_of"] for t in trials if t.user_attrs.get("retry_of") is not None}
    ran = [json.dumps(t.params, sort_keys=True) for t in launched]
    twice = {p for p in ran if ran.count(p) > 1}
    assert not twice, f"configs launched twice: {twice}"
    for t in trials:
        if t.user_attrs.get("retry_of") is not None:
            original = trials[t.user_attrs["retry_of"]]
            assert original.user_attrs["status"] == "interrupted" and original.params == t.params
    assert len(retried) == sum(t.user_attrs.get("retry_of") is not None for t in trials), "a trial retried twice"


def assert_ok(trial: optuna.trial.FrozenTrial, folder: Path) -> None:
    """``trial`` ran whole and its values are in the study, as is its folder."""
    from optuna.trial import TrialState

    assert trial.user_attrs["status"] == "ok", (trial.number, trial.user_attrs.get("reason"),
                                                 trial.user_attrs.get("error_tail"))
    assert trial.state == TrialState.COMPLETE and len(trial.values) == 2
    assert trial.user_attrs["metrics"]["tokens_per_second"] > 0
    assert (folder / "cotune-runs" / STUDY / f"trial-{trial.number:04d}" / "result.json").is_file()


def ours(folder: Path) -> list[psutil.Process]:
    """Live processes started for the tests in ``folder``: its searches and all they started (they run in
    it, or carry its marker path in their environment), whichever process they hang under now."""
    found = []
    for p in psutil.process_iter(["pid", "cwd", "status"]):
        if p.info["pid"] == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cwd = p.info["cwd"] or ""
        if cwd == str(folder) or cwd.startswith(str(folder) + os.sep):
            found.append(p)
            continue
        try:
            marker = p.environ().get(MARKER_ENV, "")
        except psutil.Error:
            continue  # gone while we looked, or not ours to read
        if marker.startswith(str(folder) + os.sep):
            found.append(p)
    return found


def assert_no_process_left(folder: Path, also: list[psutil.Process] = (), within_s: float = 10.0) -> None:
    """Nothing started for ``folder`` is still running (given ``within_s`` to die), nor any of ``also``."""
    deadline = time.monotonic() + within_s
    while True:
        left = [p for p in {*ours(folder), *also} if _alive(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not left, "left running: " + "; ".join(f"{p.pid} {_cmdline(p)}" for p in left)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:200]
    except psutil.Error:
        return "?"


@pytest.fixture
def folder(tmp_path) -> Path:
    """The searches' working folder; whatever happens in the test, nothing started there outlives it."""
    yield tmp_path
    for p in ours(tmp_path):
        try:
            p.kill()
        except psutil.Error:
            pass


def wait_for(what: str, check, within_s: float = 180.0, every_s: float = 0.05):
    """``check()``'s first true value, polled every ``every_s``; fails the test after ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"waited {within_s:g} s for {what}")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (tests/postgres.py) for the tests that need its table locks or a restart."""
    server = Server()
    yield server
    server.close()


def sql(server: Server, database: str, query: str, *args) -> list[tuple] | None:
    """The rows of ``query`` on ``database``, or None while it cannot answer (tables not made yet, server down)."""
    import psycopg

    try:
        with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname=database,
                             autocommit=True, connect_timeout=5) as conn:
            return conn.execute(query, args).fetchall()
    except psycopg.Error:
        return None
