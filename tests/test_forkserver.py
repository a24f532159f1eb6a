"""Warm trial starts: trials forked from the fork server behave as fresh ones do, one-process
ones and torchrun's with their ranks forked."""

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

from cotune.config import BatchConfig, OptimizerConfig, ParallelConfig, RunConfig, TrialConfig
from cotune.forkserver import PRELOAD, PRELOAD_CPU, ForkServer
from cotune.runner import child_env, launch_trial, trial_env

REPO_ROOT = Path(__file__).resolve().parent.parent

# A short run: 8 sequences of 64 bytes per step, 40 steps to the budget (test_trial.py's BASE).
BASE = TrialConfig(
    batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2),
    optimizer=OptimizerConfig(learning_rate=3e-3),
    run=RunConfig(warmup_steps=2, measured_steps=4, token_budget=8 * 64 * 40, eval_tokens=2048),
)

# User workloads (``faulty:NAME``) that misbehave once the trial has read its data. Each first
# writes who runs it to pids.json beside this module (pids.rankN.json on rank N > 0): the trial's
# pid, its parent's and its grandparent's. The ``*_on_rank1`` ones misbehave on rank 1 only; rank 0 waits in a collective.
FAULTY = """
import json, os, subprocess, sys, time
from pathlib import Path
import psutil

def _say(**extra):
    pids = {"trial": os.getpid(), "parent": os.getppid(), "grandparent": psutil.Process(os.getppid()).ppid(), **extra}
    here = Path(__file__).parent
    rank = int(os.environ.get("RANK", "0"))
    name = "pids.json" if rank == 0 else f"pids.rank{rank}.json"
    (here / f"{name}.tmp").write_text(json.dumps(pids))
    os.replace(here / f"{name}.tmp", here / name)

def _on_rank1(misbehave):
    import torch
    import torch.distributed as dist
    _say()
    if dist.get_rank() == 1:
        misbehave()
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1
    raise RuntimeError("rank 0 got past the collective")

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

def hang_on_rank1(cfg):
    _on_rank1(lambda: time.sleep(60))

def raises_on_rank1(cfg):
    def fail():
        raise RuntimeError("rank 1 does not build")
    _on_rank1(fail)
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


def _with_model(model: str, timeout_s: float = 60.0, config: TrialConfig = BASE) -> TrialConfig:
    return dataclasses.replace(config, workload=dataclasses.replace(config.workload, model=model),
                               run=dataclasses.replace(config.run, timeout_s=timeout_s))


def _two_processes(parallel: ParallelConfig) -> TrialConfig:
    """BASE on two processes: the same global batch, half the accumulation steps per data-parallel rank."""
    accum = BASE.batch.grad_accum_steps // parallel.data_parallel
    return dataclasses.replace(BASE, parallel=parallel, batch=dataclasses.replace(BASE.batch, grad_accum_steps=accum))


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


def test_the_server_initialises_no_device_and_imports_triton_only_without_one() -> None:
    # Fork is safe only before CUDA is initialised; triton, which looks for a driver, is preloaded only by a
    # torch built without an accelerator runtime.
    code = ("import importlib, sys, torch\n"
            f"for name in {PRELOAD!r} + {PRELOAD_CPU!r}: importlib.import_module(name)\n"
            "sys.exit(('triton' in sys.modules) * 1 + torch.cuda.is_initialized() * 2)")
    done = subprocess.run([sys.executable, "-c", code], env={**child_env(), "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=120)
    import torch

    assert done.returncode == (1 if torch.version.cuda is None and torch.version.hip is None else 0), done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_trial_whose_triton_mode_differs_from_the_servers_starts_fresh(tmp_path: Path) -> None:
    # Triton reads TRITON_INTERPRET once, at its first import, which the server did with its own value.
    env = {**child_env(), "TRITON_INTERPRET": "1"}
    with ForkServer() as server:
        assert server.start(env)
        assert server.start_trial(["--help"], env={**env, "TRITON_INTERPRET": "0"}, log_path=tmp_path / "log") is None
        same = server.start_trial(["--help"], env=env, log_path=tmp_path / "log")
        assert same is not None and same.wait(timeout=60) == 0  # argparse's --help, forked


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
        assert server.start(trial_env("cpu"))  # the environment its trials have, so the trial is forked
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


# --------------------------------------------------------------------------- torchrun trials, ranks forked


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("parallel", [ParallelConfig(dp=2), ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=2)],
                         ids=["dp2", "pp2"])
def test_a_warm_torchrun_trial_trains_exactly_as_a_fresh_one(tmp_path: Path, cache: Path,
                                                             parallel: ParallelConfig) -> None:
    config = _two_processes(parallel)
    fresh = launch_trial(config, tmp_path / "fresh", cache_dir=cache)
    with ForkServer(tmp_path / "server.log") as server:
        warm = launch_trial(config, tmp_path / "warm", cache_dir=cache, fork_server=server)
        assert server.failed is None
    assert (fresh.status, warm.status) == ("ok", "ok"), (warm.reason, warm.error_tail)
    assert warm.metrics["val_loss"] == pytest.approx(fresh.metrics["val_loss"], abs=1e-6)
    flat = [[value for point in result.loss_curve for value in point] for result in (fresh, warm)]
    assert flat[0] == pytest.approx(flat[1], abs=1e-6)
    # torchrun's own launcher ran it: its banner is in the trial's log, and the ranks started warm.
    assert "OMP_NUM_THREADS" in (tmp_path / "warm" / "log.txt").read_text()
    assert warm.phase_seconds["start_and_import"] < fresh.phase_seconds["start_and_import"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_warm_torchrun_trial_that_hangs_on_one_rank_is_killed_whole_at_its_timeout(
    tmp_path: Path, cache: Path, faulty: Path
) -> None:
    with ForkServer() as server:
        result = launch_trial(_with_model("faulty:hang_on_rank1", timeout_s=20.0, config=_two_processes(
            ParallelConfig(dp=2))), tmp_path / "t", cache_dir=cache, fork_server=server)
        ranks = [json.loads((faulty / name).read_text()) for name in ("pids.json", "pids.rank1.json")]
        agent = ranks[0]["parent"]
        assert ranks[1]["parent"] == agent and ranks[0]["grandparent"] == server.pid  # torchrun forked, ranks forked
        assert (result.status, result.reason) == ("timeout", "ran past its 20 s timeout")
        assert all(_gone(pid) for pid in (agent, ranks[0]["trial"], ranks[1]["trial"]))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_warm_torchrun_trial_whose_rank_fails_says_what_a_fresh_one_says(tmp_path: Path, cache: Path,
                                                                          faulty: Path) -> None:
    config = _with_model("faulty:raises_on_rank1", config=_two_processes(ParallelConfig(dp=2)))
    fresh = launch_trial(config, tmp_path / "fresh", cache_dir=cache)
    with ForkServer() as server:
        warm = launch_trial(config, tmp_path / "warm", cache_dir=cache, fork_server=server)
        assert json.loads((faulty / "pids.json").read_text())["grandparent"] == server.pid
    assert warm.status == fresh.status == "crash"
    assert warm.reason == fresh.reason == "RuntimeError on rank 1: rank 1 does not build"


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killing_the_search_leaves_no_rank_of_a_warm_torchrun_trial_behind(tmp_path: Path, cache: Path,
                                                                          faulty: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(_with_model("faulty:hang_on_rank1", config=_two_processes(ParallelConfig(dp=2))).to_json())
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    search = subprocess.Popen([sys.executable, str(script), str(config_path), str(tmp_path / "runs"), str(cache)],
                              env=child_env())
    try:
        ranks = [_wait_for(faulty / name) for name in ("pids.json", "pids.rank1.json")]
        agent = ranks[0]["parent"]
        assert psutil.Process(ranks[0]["grandparent"]).ppid() == search.pid  # the search's fork server
        search.send_signal(signal.SIGKILL)
        search.wait()
        for pid, what in ((agent, "torchrun"), (ranks[0]["trial"], "rank 0"), (ranks[1]["trial"], "rank 1")):
            assert _gone(pid), f"{what} outlived its search"
    finally:
        search.kill()
        search.wait()
