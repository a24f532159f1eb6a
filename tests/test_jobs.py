"""``cotune search --jobs N``: N trials at once on one machine, each on its own cores (and GPUs)."""

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

from cotune import jobs, workers
from cotune.errors import UserError
from tests.test_workers import TINY

CORES = sorted(os.sched_getaffinity(0))


def test_cpu_slots_are_disjoint_and_cover_the_cores():
    slots = jobs.slots(2, "cpu", 1, 0)
    assert [s.index for s in slots] == [0, 1] and all(s.of == 2 and s.gpus == () for s in slots)
    assert set(slots[0].cpus).isdisjoint(slots[1].cpus) and all(s.cpus for s in slots)
    assert sorted(slots[0].cpus + slots[1].cpus) == CORES[: 2 * (len(CORES) // 2)]


def test_gpu_slots_take_the_trials_world_size_each(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [s.gpus for s in jobs.slots(2, "cuda", 2, 4)] == [("0", "1"), ("2", "3")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # what the user made visible is what is split
    assert [s.gpus for s in jobs.slots(2, "cuda", 1, 4)] == [("4",), ("5",)]
    with pytest.raises(UserError, match=r"--jobs 2: each trial of this space takes up to 4 GPU\(s\), so 2 jobs need 8"):
        jobs.slots(2, "cuda", 4, 4)


def test_more_jobs_than_cores_is_refused():
    with pytest.raises(UserError, match=rf"--jobs {len(CORES) + 1}: this machine gives cotune {len(CORES)} CPU core"):
        jobs.slots(len(CORES) + 1, "cpu", 1, 0)


def test_slot_description_names_its_devices():
    assert jobs.Slot(0, 2, (0, 1, 2, 5), ("3",)).describe() == "job 1/2: GPU 3, cores 0-2,5"
    assert jobs.Slot(1, 2, (7,)).describe() == "job 2/2: core 7"


def _search(space: Path, cwd: Path, *flags: str, budget: int = 6) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cotune.cli", "search", "--space", str(space), "--budget", str(budget), "--seed", "0",
         "--no-reuse", *flags], cwd=cwd, env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _leftovers(folder: Path) -> list[psutil.Process]:
    """Processes still running a trial or a worker of a search in ``folder``."""
    left = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        with_us = any(m in " ".join(p.info["cmdline"] or []) for m in ("cotune.trial", "cotune.jobs", "cotune.forkserver"))
        if with_us and str(folder) in (p.info["cwd"] or ""):
            left.append(p)
    return left


@pytest.fixture
def space(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("name: cpu-tiny-gpt", "name: tiny"))
    return path


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_jobs_run_trials_at_once_on_their_own_cores_to_the_exact_budget(space, tmp_path):
    done = _search(space, tmp_path, "--jobs", "2")
    out, _ = done.communicate(timeout=540)
    assert done.returncode == 0, out
    assert "2 trials at once: job 1/2: core" in out and "job 1 · trial" in out and "job 2 · trial" in out
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    every = study.get_trials(deepcopy=False)
    trials = [t for t in every if t.user_attrs["status"] not in ("interrupted", "infeasible")]
    assert workers.launched(every) == 6 and len(trials) == 6, out  # none lost, none run twice
    # Both jobs may ask for the last slot at once: the later one closes its trial unrun, and it does not count.
    unrun = [t.user_attrs["reason"] for t in every if t.user_attrs["status"] == "interrupted"]
    assert all(r.startswith("not run: the study's budget of 6 launched trials was spent") for r in unrun), out
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1  # the queued baseline went to one job
    slots = {t.user_attrs["job"]["index"]: t.user_attrs["job"]["cpus"] for t in trials}
    assert set(slots) == {0, 1} and set(slots[0]).isdisjoint(slots[1])
    for t in trials:
        m = t.user_attrs["metrics"]
        if "cpu_cores" in m:  # what the trial's rank measured of itself: the job's cores, threads to match
            world = t.user_attrs["knobs"]["world_size"]
            assert m["cpu_cores"] == len(t.user_attrs["job"]["cpus"])
            assert m["cpu_threads"] == max(1, m["cpu_cores"] // world)
    # The two jobs' trials overlapped in time: they ran at once.
    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["job"]["index"]) for t in trials]
    assert any(a0 < b1 and b0 < a1 for a0, a1, ja in spans for b0, b1, jb in spans if ja != jb), (spans, out)
    assert _leftovers(tmp_path) == []
    again = _search(space, tmp_path, "--jobs", "2")
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0 and "the budget of 6 is spent" in out, out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_of_a_jobs_search_records_both_running_trials_as_interrupted(space, tmp_path):
    slow = tmp_path / "slow.yaml"
    slow.write_text(space.read_text().replace("token_budget: 16384 ", "token_budget: 262144 "))
    search = _search(slow, tmp_path, "--jobs", "2", "--no-early-stopping")
    storage = f"sqlite:///{tmp_path / 'cotune.db'}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until both jobs run a launched trial
        time.sleep(0.5)
        try:
            running = [t for t in optuna.load_study(study_name="tiny", storage=storage).get_trials(deepcopy=False)
                       if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("launched")]
        except (KeyError, optuna.exceptions.StorageInternalError):
            continue
        if len({t.user_attrs.get("job", {}).get("index") for t in running}) == 2:
            break
    else:
        search.kill()
        raise AssertionError("the two jobs never ran trials at once:\n" + search.communicate()[0])
    search.send_signal(signal.SIGTERM)
    out, _ = search.communicate(timeout=90)
    assert search.returncode == 143, out
    assert "terminated (SIGTERM)" in out
    study = optuna.load_study(study_name="tiny", storage=storage)
    interrupted = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") == "interrupted"]
    assert len(interrupted) == 2 and all("SIGTERM" in t.user_attrs["reason"] for t in interrupted)
    assert {t.user_attrs["job"]["index"] for t in interrupted} == {0, 1}
    assert not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    assert _leftovers(tmp_path) == []


def test_too_many_jobs_is_one_error_line_and_no_study(space, tmp_path):
    done = _search(space, tmp_path, "--jobs", str(len(CORES) + 1))
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 2
    assert out.strip().splitlines()[-1].startswith(f"error: --jobs {len(CORES) + 1}: this machine gives cotune")
    assert "Traceback" not in out and not (tmp_path / "cotune.db").exists()
