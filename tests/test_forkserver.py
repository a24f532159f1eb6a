"""Warm trial starts: one-process trials forked from the fork server behave as fresh ones do."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from cotune.config import BatchConfig, OptimizerConfig, RunConfig, TrialConfig
from cotune.forkserver import PRELOAD, ForkServer
from cotune.runner import child_env, launch_trial

REPO_ROOT = Path(__file__).resolve().parent.parent

# A short run: 8 sequences of 64 bytes per step, 40 steps to the budget (test_trial.py's BASE).
BASE = TrialConfig(
    batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2),
    optimizer=OptimizerConfig(learning_rate=3e-3),
    run=RunConfig(warmup_steps=2, measured_steps=4, token_budget=8 * 64 * 40, eval_tokens=2048),
)

# User workloads (``faulty:NAME``) that misbehave once the trial has read its data. Each first
# writes who runs it to pids.json beside this module: the trial's pid and its parent's.
FAULTY = """
import json, os, subprocess, sys, time
from pathlib import Path

def _say(**extra):
    pids = {"trial": os.getpid(), "parent": os.getppid(), **extra}
    here = Path(__file__).parent
    (here / "pids.tmp").write_text(json.dumps(pids))
    os.replace(here / "pids.tmp", here / "pids.json")

def hang(cfg):  # with a grandchild in the trial's group
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _say(sleeper=sleeper.pid)
    time.sleep(60)

def hang_alone(cfg):
    _say()
    time.sleep(60)

def abort(cfg):
    _say()
    os.abort()

def raises(cfg):
    _say()
    raise RuntimeError("this workload does not build")
"""

# A search-like loop in its own process: trials of argv[1]'s config forked from its fork server.
SEARCH_SCRIPT = """
import sys
from pathlib import Path
from cotune.config import TrialConfig
from cotune.forkserver import ForkServer
from cotune.runner import launch_trial
config = TrialConfig.load(sys.argv[1])
with ForkServer() as server:
    for number in range(3):
        launch_trial(config, Path(sys.argv[2]) / str(number), cache_dir=Path(sys.argv[3]), fork_server=server)
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builtin corpus's cache, shared with test_trial.py (it takes seconds to build)."""
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.fixture
def faulty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding faulty.py, on the trials' path (set before any fork server starts)."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "faulty.py").write_text(textwrap.dedent(FAULTY))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(folder), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    return folder


def _with_model(model: str, timeout_s: float = 60.0) -> TrialConfig:
    return dataclasses.replace(BASE, workload=dataclasses.replace(BASE.workload, model=model),
                               run=dataclasses.replace(BASE.run, timeout_s=timeout_s))


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Exited (no such process, or a zombie) within ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _wait_for(path: Path, within_s: float = 120.0) -> dict:
    deadline = time.monotonic() + within_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.05)
    return json.loads(path.read_text())


def test_the_server_preloads_neither_triton_nor_a_device() -> None:
    # Fork is safe only before CUDA is initialised, and TRITON_INTERPRET is read at triton's first import.
    code = ("import importlib, sys, torch\n"
            f"for name in {PRELOAD!r}: importlib.import_module(name)\n"
            "sys.exit(('triton' in sys.modules) * 1 + torch.cuda.is_initialized() * 2)")
    done = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_warm_trial_trains_exactly_as_a_fresh_one(tmp_path: Path, cache: Path) -> None:
    fresh = launch_trial(BASE, tmp_path / "fresh", cache_dir=cache)
    with ForkServer(tmp_path / "server.log") as server:
        warm = launch_trial(BASE, tmp_path / "warm", cache_dir=cache, fork_server=server)
        assert server.failed is None and server.pid is not None
    assert (fresh.status, warm.status) == ("ok", "ok"), (warm.reason, warm.error_tail)
    assert abs(fresh.metrics["val_loss"] - warm.metrics["val_loss"]) < 1e-6
    flat = [[value for point in result.loss_curve for value in point] for result in (fresh, warm)]
    assert flat[0] == pytest.approx(flat[1], abs=1e-6)
    assert (tmp_path / "warm" / "config.json").read_text() == (tmp_path / "fresh" / "config.json").read_text()
    # The start is counted from the fork, so it is the time to get ready, not the server's age.
    assert 0 < warm.phase_seconds["start_and_import"] < warm.phase_seconds["process_wall"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_hanging_warm_trial_is_killed_with_its_group_at_its_timeout(tmp_path: Path, cache: Path, faulty: Path) -> None:
    with ForkServer() as server:
        result = launch_trial(_with_model("faulty:hang", timeout_s=30.0), tmp_path / "t", cache_dir=cache,
                              fork_server=server)
        pids = json.loads((faulty / "pids.json").read_text())
        assert pids["parent"] == server.pid  # forked, not started fresh
        assert (result.status, result.reason) == ("timeout", "ran past its 30 s timeout")
        assert _gone(pids["trial"]) and _gone(pids["sleeper"])
        # The server outlives its trial and forks the next one.
        (faulty / "pids.json").unlink()
        again = launch_trial(_with_model("faulty:raises"), tmp_path / "t2", cache_dir=cache, fork_server=server)
        assert json.loads((faulty / "pids.json").read_text())["parent"] == server.pid
    assert again.status == "crash"
    assert "this workload does not build" in again.reason, again.reason


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("model", ["faulty:abort", "faulty:raises"])
def test_a_crashing_warm_trial_is_classified_as_a_fresh_one(tmp_path: Path, cache: Path, faulty: Path,
                                                            model: str) -> None:
    fresh = launch_trial(_with_model(model), tmp_path / "fresh", cache_dir=cache)
    assert json.loads((faulty / "pids.json").read_text())["parent"] == os.getpid()
    (faulty / "pids.json").unlink()
    with ForkServer() as server:
        warm = launch_trial(_with_model(model), tmp_path / "warm", cache_dir=cache, fork_server=server)
        assert json.loads((faulty / "pids.json").read_text())["parent"] == server.pid
    assert warm.status == fresh.status == "crash"
    assert warm.reason == fresh.reason
    if model == "faulty:abort":
        assert warm.reason == "killed by signal SIGABRT"
        assert "Fatal Python error: Aborted" in warm.error_tail  # the fault handler wrote to the trial's log


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killing_the_search_leaves_no_trial_or_server_behind(tmp_path: Path, cache: Path, faulty: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(_with_model("faulty:hang_alone").to_json())
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    search = subprocess.Popen([sys.executable, str(script), str(config_path), str(tmp_path / "runs"), str(cache)],
                              env=child_env())
    try:
        pids = _wait_for(faulty / "pids.json")
        server = psutil.Process(pids["parent"])
        assert server.ppid() == search.pid
        search.send_signal(signal.SIGKILL)
        search.wait()
        assert _gone(server.pid), "the fork server outlived its search"
        assert _gone(pids["trial"]), "the trial outlived its search"
    finally:
        search.kill()
        search.wait()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_when_the_server_dies_its_trial_is_a_crash_and_the_next_trials_start_fresh(
    tmp_path: Path, cache: Path, faulty: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with ForkServer() as server:
        assert server.start(child_env())
        server_pid = server.pid

        def kill_the_server() -> None:
            _wait_for(faulty / "pids.json")
            os.kill(server_pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_the_server)
        killer.start()
        result = launch_trial(_with_model("faulty:hang_alone"), tmp_path / "t", cache_dir=cache, fork_server=server)
        killer.join()
        trial_pid = json.loads((faulty / "pids.json").read_text())["trial"]
        assert (result.status, result.reason) == ("crash", "killed when the fork server it was forked from died")
        assert _gone(trial_pid)
        assert server.failed is not None
        (faulty / "pids.json").unlink()
        again = launch_trial(_with_model("faulty:raises"), tmp_path / "t2", cache_dir=cache, fork_server=server)
        assert json.loads((faulty / "pids.json").read_text())["parent"] == os.getpid()  # started fresh
        assert again.status == "crash"
    assert capfd.readouterr().err.count("trials start fresh from now on") == 1
