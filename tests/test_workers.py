"""Several `cotune search` workers sharing one study on a real PostgreSQL server.

Each worker is the real command line in its own process, started at the same moment as the
others on a fresh database: they share the study, launch exactly --budget trials between
them, never print the storage's password, and a worker killed mid-trial leaves nothing
running: the live workers close its trial and run that config again, so the budget is exact.
"""

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

from cotune import workers
from cotune.config import TrialResult
from cotune.study import counted_trials
from tests.conftest import CPU_SPACE
from tests.postgres import PASSWORD, Server, binaries

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(binaries() is None and not os.environ.get("CI"),
                       reason="needs PostgreSQL: apt-get install -y postgresql"),
]

# The default CPU space, with trials of a few steps (a second or two each, most of it the trial's start).
TINY = (CPU_SPACE.read_text()
        .replace("warmup_steps: 3", "warmup_steps: 1").replace("measured_steps: 20", "measured_steps: 2")
        .replace("token_budget: 98304 ", "token_budget: 16384 ").replace("eval_tokens: 16384", "eval_tokens: 2048"))


@pytest.fixture(scope="module")
def postgres():
    server = Server()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "tiny.yaml"
    path.write_text(TINY.replace("name: cpu-tiny-gpt", "name: tiny"))
    return path


def _workers(n: int, url: str, study: str, budget: int, space: Path, cwd: Path, seed: str = "0") -> list[subprocess.Popen]:
    """``n`` `cotune search` workers on one study, each started the moment the last is ready to go."""
    argv = [sys.executable, "-m", "cotune.cli", "search", "--storage", url, "--study", study, "--budget", str(budget),
            "--space", str(space), "--seed", seed, "--no-early-stopping"]
    env = {**os.environ, "COLUMNS": "200"}
    return [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(n)]


def _launched(url: str, study: str) -> list[optuna.trial.FrozenTrial]:
    loaded = optuna.load_study(study_name=study, storage=url.replace(PASSWORD, "x"))
    return [t for t in counted_trials(loaded) if t.user_attrs["status"] != "infeasible"]


@pytest.mark.slow
def test_three_workers_started_together_launch_exactly_the_budget(postgres, tiny_space, tmp_path):
    for round_ in range(3):  # a fresh database each time: the workers also race to create Optuna's tables
        url = postgres.url(f"together{round_}")
        workers = _workers(3, url, "shared", 9, tiny_space, tmp_path)
        outputs = [w.communicate(timeout=300)[0] for w in workers]
        for w, out in zip(workers, outputs, strict=True):
            assert w.returncode == 0, out[-3000:]
            assert PASSWORD not in out
        trials = _launched(url, "shared")
        assert len(trials) == 9, [o[-1500:] for o in outputs]
        assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
        # No config ran twice, and every worker's progress counted the others' trials.
        configs = [t.user_attrs["config"] for t in trials]
        assert all(configs.count(c) == 1 for c in configs)
        assert any("9/9" in out or "launched 9" in out for out in outputs), outputs[0][-2000:]
        assert len({t.user_attrs["search_pid"] for t in trials}) >= 2  # the work was shared


@pytest.mark.slow
def test_a_worker_killed_mid_trial_leaves_nothing_running_and_a_restart_resumes_to_the_budget(
    postgres, tiny_space, tmp_path
):
    url = postgres.url("killed")
    workers = _workers(3, url, "shared", 9, tiny_space, tmp_path)
    victim = workers[0]
    # Wait for the victim's trial to be running: a trial process (fork server's child) of its own.
    deadline = time.monotonic() + 180
    trial_tree: list[psutil.Process] = []
    while time.monotonic() < deadline and not trial_tree:
        time.sleep(0.2)
        server = [c for c in psutil.Process(victim.pid).children() if "cotune.forkserver" in " ".join(c.cmdline())]
        trial_tree = [p for s in server for p in s.children(recursive=True)]
    assert trial_tree, "the victim never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    gone, alive = psutil.wait_procs(trial_tree, timeout=10)
    assert not alive, f"left running after its search was killed: {[p.cmdline() for p in alive]}"
    for w in workers[1:]:
        out = w.communicate(timeout=300)[0]
        assert w.returncode == 0, out[-3000:]
    restarted = subprocess.run(
        [sys.executable, "-m", "cotune.cli", "search", "--storage", url, "--study", "shared", "--budget", "9",
         "--space", str(tiny_space), "--seed", "0", "--no-early-stopping"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert restarted.returncode == 0, restarted.stdout[-3000:] + restarted.stderr[-3000:]
    assert PASSWORD not in restarted.stdout + restarted.stderr
    study = optuna.load_study(study_name="shared", storage=url)
    assert len(_launched(url, "shared")) == 9
    interrupted = [t for t in study.get_trials() if t.user_attrs.get("status") == "interrupted"]
    assert [t.user_attrs["search_pid"] for t in interrupted] == [victim.pid]
    # A live worker on this host noticed at once, and ran that config again.
    (retry,) = [t for t in study.get_trials() if t.user_attrs.get("retry_of") is not None]
    assert retry.user_attrs["retry_of"] == interrupted[0].number and retry.params == interrupted[0].params
    assert retry.user_attrs["status"] in ("ok", "pruned", "oom", "timeout", "crash", "diverged")
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def _fake_run(config, trial_dir, on_rung=None) -> TrialResult:
    time.sleep(0.05)
    return TrialResult("ok", metrics={"tokens_per_second": 1000.0 * config.batch.micro_batch_size,
                                      "val_loss": config.optimizer.learning_rate * 100, "peak_memory_bytes": 1e6},
                       loss_curve=[[1, 64, 4.0]])


WORKER = """
import sys, time
from pathlib import Path
import optuna
from cotune import search, workers
from cotune.hardware import fingerprint
from cotune.space import load_space
from cotune.study import open_storage
from tests.test_workers import _fake_run
url, start_at, space_path, out = sys.argv[1], float(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
space = load_space(space_path)
fp = fingerprint()
settings = search.SearchSettings(space=space, space_path=space_path, objectives=list(space.objectives), budget=9,
                                 fingerprint=fp, vocab_size=256, runs_dir=out, seed=0,
                                 world_size=search.check_hardware(space, space_path, fp))
time.sleep(max(0.0, start_at - time.time()))
study = search.create_or_resume_study(open_storage(url), "race", settings, baseline=True)
search.run_search(study, settings, _fake_run)
"""


@pytest.mark.slow
def test_the_budget_is_exact_however_the_workers_race(postgres, tmp_path):
    # The search loop itself (trials that take 50 ms), four workers started on the same instant, ten times over.
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    for round_ in range(10):
        url = postgres.url(f"race{round_}")
        start_at = time.time() + 6.0  # every worker has imported and probed by then
        procs = [subprocess.Popen([sys.executable, str(script), url, str(start_at), str(CPU_SPACE), str(tmp_path)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outs]
        study = optuna.load_study(study_name="race", storage=url)
        launched = [t for t in counted_trials(study) if t.user_attrs["status"] != "infeasible"]
        assert len(launched) == 9, f"round {round_}: {len(launched)} launched"
        assert sum(bool(t.user_attrs.get("baseline")) for t in launched) == 1
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert workers.launched(study.get_trials()) == 9
