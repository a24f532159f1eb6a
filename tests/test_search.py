"""The engine driven by a fast fake trial: budget, resume, recording, failures, samplers."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from cotune import derive, search, workers
from cotune.config import STATUSES, TrialConfig, TrialResult
from cotune.errors import UserError
from cotune.samplers import SAMPLERS
from cotune.space import load_space
from cotune.study import counted_trials, pareto_trials
from tests.conftest import CPU_SPACE


def fake_trial(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Throughput grows with the micro batch, loss is best near lr=3e-3: a real trade-off, instantly."""
    k = config.flat()
    if k["learning_rate"] > 2e-2:
        return TrialResult(status="diverged", reason="train loss became nan at step 3")
    tokens_per_second = 1000.0 * config.batch.micro_batch_size / (1.3 if k["activation_checkpointing"] else 1.0)
    loss = 2.0 + (math.log10(k["learning_rate"]) + 2.5) ** 2 + 0.002 * k["global_batch_size"]
    return TrialResult(status="ok", metrics={
        "tokens_per_second": tokens_per_second, "val_loss": loss, "peak_memory_bytes": 1e6 * k["micro_batch_size"],
    }, loss_curve=[[1, 64, 5.0], [2, 128, loss]])


def settings(fingerprint, tmp_path, **kw) -> search.SearchSettings:
    space = load_space(CPU_SPACE)
    defaults = dict(space=space, space_path=str(CPU_SPACE), objectives=list(space.objectives), budget=12,
                    fingerprint=fingerprint, vocab_size=256, runs_dir=tmp_path / "runs", seed=0,
                    world_size=search.check_hardware(space, str(CPU_SPACE), fingerprint))
    return search.SearchSettings(**{**defaults, **kw})


def study_for(tmp_path, s):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'study.db'}")
    return search.create_or_resume_study(storage, "t", s)


def test_search_fills_the_budget_and_records_everything(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path)
    study = study_for(tmp_path, s)
    progress = search.run_search(study, s, fake_trial)
    assert progress.done == 12 and sum(progress.by_status.values()) == 12
    reloaded = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'study.db'}")
    trials = reloaded.get_trials()
    assert len(trials) == 12
    assert reloaded.user_attrs["hardware_id"] == fingerprint["hardware_id"]
    for t in trials:
        attrs = t.user_attrs
        assert attrs["status"] in STATUSES
        assert attrs["fingerprint"]["hardware_id"] == fingerprint["hardware_id"]
        assert attrs["cotune_version"]
        config = TrialConfig.from_dict(attrs["config"])  # the full config, loadable as is
        if attrs["status"] == "ok":
            assert t.state == optuna.trial.TrialState.COMPLETE
            assert t.values == [attrs["metrics"]["tokens_per_second"], attrs["metrics"]["val_loss"]]
            assert attrs["loss_curve"][-1][2] == attrs["metrics"]["val_loss"]
        else:
            assert t.state == optuna.trial.TrialState.FAIL and attrs["reason"]
        assert config.run.seed == 0
    assert len(pareto_trials(reloaded)) >= 1


def test_rerun_resumes_up_to_the_budget(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=5)
    search.run_search(study_for(tmp_path, s), s, fake_trial)
    calls = []

    def counting(config, trial_dir):
        calls.append(config)
        return fake_trial(config, trial_dir)

    search.run_search(study_for(tmp_path, s), s, counting)
    assert calls == []  # budget already spent
    s8 = settings(fingerprint, tmp_path, budget=8)
    progress = search.run_search(study_for(tmp_path, s8), s8, counting)
    assert len(calls) == 3 and progress.done == 8


def test_failures_are_data_and_the_search_goes_on(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=10, sampler="random")
    outcomes = iter(["crash", "oom", "timeout", "ok"] * 3)

    def flaky(config, trial_dir):
        status = next(outcomes)
        if status == "ok":
            return fake_trial(config, trial_dir)
        return TrialResult(status=status, reason=f"{status} on purpose", error_tail="Traceback ...\nBoom")

    progress = search.run_search(study_for(tmp_path, s), s, flaky)
    assert progress.done == 10
    assert progress.by_status["crash"] == 3 and progress.by_status["oom"] == 3 and progress.by_status["timeout"] == 2
    failed = [t for t in counted_trials(study_for(tmp_path, s)) if t.user_attrs["status"] == "crash"]
    assert failed[0].user_attrs["error_tail"].endswith("Boom")


def test_infeasible_configs_are_never_launched(fingerprint, tmp_path):
    space = load_space(CPU_SPACE)
    # A declared constraint that rules out every micro batch above 8.
    from cotune.space import Constraint

    space = space.model_copy(update={"constraints": [Constraint(expr="micro_batch_size <= 8", why="test")]})
    s = settings(fingerprint, tmp_path, space=space, budget=15, sampler="random")
    launched = []

    def run(config, trial_dir):
        launched.append(config.batch.micro_batch_size)
        return fake_trial(config, trial_dir)

    progress = search.run_search(study_for(tmp_path, s), s, run)
    assert len(launched) == 15 and max(launched) <= 8  # the budget counts launched trials only
    assert progress.done == 15 and progress.by_status["infeasible"] == progress.infeasible_here > 0
    infeasible = [t for t in counted_trials(study_for(tmp_path, s)) if t.user_attrs["status"] == "infeasible"]
    assert "micro_batch_size <= 8 must hold (test), but got micro_batch_size=" in infeasible[0].user_attrs["reason"]
    # Told as a violated constraint (which TPE, NSGA-II and GP learn from), never as a failure.
    assert all(t.state == optuna.trial.TrialState.PRUNED and t.constraints == {"feasible": 1.0} for t in infeasible)
    launched_trials = [t for t in counted_trials(study_for(tmp_path, s)) if t.user_attrs["status"] != "infeasible"]
    assert all(t.constraints == {"feasible": 0.0} for t in launched_trials)


def test_a_mostly_infeasible_space_stops_at_the_cap(fingerprint, tmp_path):
    from cotune.space import Constraint

    space = load_space(CPU_SPACE)
    space = space.model_copy(update={"constraints": [Constraint(expr="micro_batch_size > 64", why="never")]})
    s = settings(fingerprint, tmp_path, space=space, budget=5, sampler="random", infeasible_cap=7)
    progress = search.run_search(study_for(tmp_path, s), s, fake_trial)
    assert progress.done == 0 and progress.infeasible_here == 7
    assert progress.stopped.startswith("stopped after 7 infeasible configs and 0 launched in this search: the space "
                                       "is mostly infeasible")
    assert len(study_for(tmp_path, s).get_trials()) == 7  # all recorded, none left running


def test_refuses_to_mix_hardware_unless_told(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=2)
    search.run_search(study_for(tmp_path, s), s, fake_trial)
    other = {**fingerprint, "hardware_id": "somewhere-else",
             "hardware": {**fingerprint["hardware"], "cpu_model": "Other CPU"}}
    with pytest.raises(UserError, match="recorded on other hardware"):
        study_for(tmp_path, settings(other, tmp_path, budget=3))
    s3 = settings(other, tmp_path, budget=3, allow_mixed_hardware=True)
    assert search.run_search(study_for(tmp_path, s3), s3, fake_trial).done == 3


def test_mixed_hardware_with_other_native_precisions_shares_one_domain(fingerprint, tmp_path):
    """The machine that creates the study fixes the precision choices; a machine that cannot run one of
    them records it as infeasible here instead of crashing on a different Optuna distribution."""
    wide = {**fingerprint, "native_precisions": {"cpu": ["fp32", "bf16", "fp16"]}}
    narrow = {**fingerprint, "hardware_id": "somewhere-else", "native_precisions": {"cpu": ["fp32", "bf16"]},
              "hardware": {**fingerprint["hardware"], "cpu_model": "Other CPU"}}
    s = settings(wide, tmp_path, budget=6, sampler="random")
    study = study_for(tmp_path, s)
    search.run_search(study, s, fake_trial)
    assert study.user_attrs["precision_choices"] == ["fp32", "bf16", "fp16"]
    s2 = settings(narrow, tmp_path, budget=30, sampler="random", allow_mixed_hardware=True)
    search.run_search(study_for(tmp_path, s2), s2, fake_trial)
    here = [t for t in study.get_trials() if t.number >= 6]
    refused = [t for t in here if t.params.get("precision") == "fp16"]
    assert refused and all(t.user_attrs["status"] == "infeasible" and t.user_attrs["reason"].startswith(
        "precision=fp16 does not run natively on this machine (it runs fp32, bf16)") for t in refused)
    assert any(t.user_attrs["status"] == "ok" for t in here)


def test_every_trial_divides_by_the_one_peak_the_study_took_at_creation(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=4, cache_dir=tmp_path / "cache")
    study = study_for(tmp_path, s)
    peaks = study.user_attrs["peak_flops"]
    assert set(peaks) == set(study.user_attrs["precision_choices"]) and all(p["flops"] > 0 for p in peaks.values())

    def with_flops(config, trial_dir):
        result = fake_trial(config, trial_dir)
        result.metrics.update(flops_per_token=1_000_000, mfu=0.99, peak_flops=1.0)  # what a trial's own probe said
        if int(trial_dir.name.rsplit("-", 1)[1]) % 2:  # ran on one core (a job's share of the machine)
            result.metrics["cpu_cores"] = 1
        return result

    search.run_search(study, s, with_flops)
    for t in study.get_trials():
        m = t.user_attrs["metrics"]
        if t.user_attrs["status"] == "ok":
            peak = peaks[t.user_attrs["config"]["precision"]["precision"]]["flops"]
            assert m["peak_flops"] == peak and m["peak_flops_source"].startswith("the study's")
            world = TrialConfig.from_dict(t.user_attrs["config"]).parallel.world_size
            # On a CPU the peak was taken on all the machine's cores; a trial gets the share its ranks had.
            share = 1 / fingerprint["hardware"]["cpu_count"] if "cpu_cores" in m else world
            assert m["mfu"] == pytest.approx(1_000_000 * m["tokens_per_second"] / (peak * share))


def test_refuses_other_objectives_or_space(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=1)
    search.run_search(study_for(tmp_path, s), s, fake_trial)
    with pytest.raises(UserError, match="--objectives"):
        study_for(tmp_path, settings(fingerprint, tmp_path, objectives=["tokens_per_second", "val_loss", "peak_memory"]))
    changed = s.space.model_copy(update={"name": "other"})
    with pytest.raises(UserError, match="--space"):
        study_for(tmp_path, settings(fingerprint, tmp_path, space=changed))


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_drives_the_search(fingerprint, tmp_path, sampler):
    s = settings(fingerprint, tmp_path, budget=14, sampler=sampler,
                 objectives=["tokens_per_second", "val_loss", "peak_memory"])
    progress = search.run_search(study_for(tmp_path, s), s, fake_trial)
    assert progress.done == 14
    study = study_for(tmp_path, s)
    assert len(study.directions) == 3
    params = [t.params for t in study.trials]
    assert len({repr(sorted(p.items())) for p in params}) >= 10  # the sampler explores
    assert progress.best["tokens_per_second"] == max(t.values[0] for t in study.trials if t.values)


def test_interrupted_trial_is_closed_and_not_counted(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=3)
    study = study_for(tmp_path, s)

    def interrupt(config, trial_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search.run_search(study, s, interrupt)
    trials = study.get_trials()
    assert [t.user_attrs["status"] for t in trials] == ["interrupted"]
    assert trials[0].state == optuna.trial.TrialState.FAIL
    assert search.run_search(study, s, fake_trial).done == 3


@pytest.mark.parametrize("where", ["run", "estimate", "record"])
def test_a_bug_anywhere_in_the_loop_leaves_no_trial_running(fingerprint, tmp_path, monkeypatch, where):
    """A bug raises (it is not data), but the trial in hand is closed first: interrupted, with the error,
    not counted, so the next search retries it."""
    s = settings(fingerprint, tmp_path, budget=3)
    study = study_for(tmp_path, s)
    run_fn = fake_trial
    if where == "run":
        def run_fn(config, trial_dir):
            raise ValueError("a bug in the runner")
    elif where == "estimate":
        monkeypatch.setattr(search.memory, "estimate", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    else:
        monkeypatch.setattr(search, "record", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        search.run_search(study, s, run_fn)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL]
    assert trials[0].user_attrs["status"] == "interrupted"
    assert trials[0].user_attrs["reason"].startswith("the search failed on this trial: ValueError: a bug")
    monkeypatch.undo()
    assert search.run_search(study, s, fake_trial).done == 3  # the failed one is not counted


def test_a_rerun_with_the_same_seed_does_not_replay_the_first_trials(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=4, sampler="random")
    search.run_search(study_for(tmp_path, s), s, fake_trial)
    s8 = settings(fingerprint, tmp_path, budget=8, sampler="random")
    study = study_for(tmp_path, s8)
    search.run_search(study, s8, fake_trial)
    trials = study.get_trials()
    first, resumed = [t.params for t in trials[:4]], [t.params for t in trials[4:]]
    assert all(r != f for r in resumed for f in first), "the resumed search proposed an earlier trial again"


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_with_a_seed_each_trial_is_sampled_from_its_own_number_whoever_asks(fingerprint, tmp_path, sampler):
    # Two workers on one study with the same --seed: whichever asks trial N gets the same proposal, so two
    # that interleave propose what one worker would, and never the same config twice at once.
    s = settings(fingerprint, tmp_path, budget=12, sampler=sampler)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = study_for(tmp_path / "one", s)
    search.run_search(one, s, fake_trial)
    shared = study_for(tmp_path / "two", s)
    other = optuna.load_study(study_name=shared.study_name, storage=shared._storage,
                              sampler=SAMPLERS[sampler](s.seed, len(s.objectives)))
    for number in range(12):  # the two workers take turns
        worker = shared if number % 2 == 0 else other
        search.run_search(worker, replace(s, budget=number + 1), fake_trial)
    assert [t.params for t in shared.get_trials()] == [t.params for t in one.get_trials()]


def test_the_baseline_is_a_new_studys_first_trial_and_the_report_measures_against_it(fingerprint, tmp_path):
    from cotune.report import report_info

    s = settings(fingerprint, tmp_path, budget=5)
    study = study_for(tmp_path, s)
    assert search.enqueue_baseline(study, s) == ""
    search.run_search(study, s, fake_trial)
    first = study.trials[0]
    assert first.user_attrs["baseline"] is True
    declared = s.space.baseline
    ran = derive.knobs_of_params(first.params)
    assert ran and {k: ran[k] for k in declared if k in ran} == {k: v for k, v in declared.items() if k in ran}
    assert report_info(study).baseline_trial == 0  # the report's own test: every declared knob ran as declared
    assert search.enqueue_baseline(study, s) == "the study holds trials already"
    outside = s.space.model_copy(update={"baseline": {**declared, "learning_rate": 1.0}})
    fresh = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'other.db'}"), "o",
                              settings(fingerprint, tmp_path, space=outside))
    assert search.enqueue_baseline(fresh, settings(fingerprint, tmp_path, space=outside)).startswith(
        "its learning_rate=1.0 is outside what the space's knobs.learning_rate allow ([0.0001, 0.03])")


def test_trials_left_running_by_a_killed_search_are_closed(fingerprint, tmp_path):
    import socket
    import subprocess
    import sys

    s = settings(fingerprint, tmp_path, budget=2)
    study = study_for(tmp_path, s)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer exists, as after a search killed with SIGKILL
    orphan = study.ask()
    orphan.set_user_attr("host", socket.gethostname())
    orphan.set_user_attr("search_pid", dead.pid)
    alive = study.ask()  # another search on this host, still running: left alone
    alive.set_user_attr("host", socket.gethostname())
    alive.set_user_attr("search_pid", __import__("os").getpid())

    assert workers.fail_stale_trials(study) == 1
    states = {t.number: (t.state, t.user_attrs.get("status")) for t in study.get_trials()}
    assert states[orphan.number] == (optuna.trial.TrialState.FAIL, "interrupted")
    assert states[alive.number] == (optuna.trial.TrialState.RUNNING, None)


def test_configs_that_cannot_fit_are_skipped_with_the_estimate(fingerprint, tmp_path):
    tiny = {**fingerprint, "hardware": {**fingerprint["hardware"], "memory_bytes": 64 * 2**20}}
    s = settings(tiny, tmp_path, budget=3, infeasible_cap=4)
    launched = []
    progress = search.run_search(study_for(tmp_path, s), s, lambda c, d: launched.append(c) or fake_trial(c, d))
    assert launched == [] and progress.by_status["infeasible"] == 4 and progress.stopped
    trial = study_for(tmp_path, s).trials[0]
    assert "exceeds the device's" in trial.user_attrs["reason"] and "GiB per rank" in trial.user_attrs["reason"]
    assert trial.user_attrs["memory_estimate"]["total"] > 32 * 2**20
    # The violation is graded: the share by which the estimate exceeds the memory there is.
    estimate = trial.user_attrs["memory_estimate"]["total"]
    assert trial.constraints["feasible"] == pytest.approx(estimate / (64 * 2**20 / s.world_size) - 1)


def test_the_estimate_is_recorded_beside_the_measured_peak(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=2)
    search.run_search(study_for(tmp_path, s), s, fake_trial)
    for t in study_for(tmp_path, s).trials:
        m = t.user_attrs["metrics"]
        assert m["estimated_peak_memory_bytes"] == t.user_attrs["memory_estimate"]["total"] > 0
        assert t.user_attrs["status"] != "ok" or "peak_memory_bytes" in m


def test_triton_kernels_without_triton_installed_are_infeasible(fingerprint, tmp_path):
    from tests.conftest import ROOT

    path = ROOT / "search_spaces" / "cpu-triton-tiny.yaml"
    without = {**fingerprint, "software": {**fingerprint["software"], "triton": None}}
    ran = []
    s = settings(without, tmp_path, space=load_space(path), space_path=str(path), budget=2, world_size=1,
                 infeasible_cap=3)
    search.run_search(study_for(tmp_path, s), s, lambda c, d: ran.append(c) or fake_trial(c, d))
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert ran == [] and [t.user_attrs["status"] for t in study.trials] == ["infeasible"] * 3
    assert "kernels=triton needs Triton" in study.trials[0].user_attrs["reason"]


def test_importance_ranks_knobs_as_they_ran_conditional_ones_included(fingerprint, tmp_path):
    """Optuna's params are conditional (a layout per world size, a micro batch per rank batch); the report
    ranks the knobs as they ran, so the micro batch (which alone sets the fake trial's speed) ranks first."""
    from cotune.report import report_info

    s = settings(fingerprint, tmp_path, budget=24, sampler="random")
    study = study_for(tmp_path, s)
    search.run_search(study, s, fake_trial)
    assert not all("micro_batch_size" in t.params for t in study.trials)  # no single parameter holds it
    info = report_info(study)
    assert info.importances is not None and "micro_batch_size" in info.importances.index
    assert info.importances["tokens_per_second"].idxmax() == "micro_batch_size"


@pytest.mark.parametrize("path", sorted((CPU_SPACE.parent).glob("cpu-*.yaml")), ids=lambda p: p.stem)
def test_every_cpu_space_declares_a_baseline_its_knobs_can_run(fingerprint, tmp_path, path):
    space = load_space(path)
    s = settings(fingerprint, tmp_path, space=space, space_path=str(path), objectives=list(space.objectives),
                 world_size=space.hardware.nproc or 1)
    study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'b.db'}"), "b", s)
    assert search.enqueue_baseline(study, s) == ""
    (queued,) = study.get_trials(deepcopy=False)
    assert queued.user_attrs["baseline"] is True


def test_a_baseline_against_a_knob_the_space_fixes_is_not_queued(fingerprint, tmp_path):
    path = CPU_SPACE.parent / "cpu-triton-tiny.yaml"
    space = load_space(path)
    for wrong, why in (({"kernels": "torch"}, "its kernels='torch' is outside what the space's knobs.kernels allow "
                                             "(['triton'])"),
                       ({"ln_block_size": None}, "its ln_block_size=1024 is outside what the space's knobs.ln_block_size")):
        baseline = {k: v for k, v in {**space.baseline, **wrong}.items() if v is not None}
        s = settings(fingerprint, tmp_path, space=space.model_copy(update={"baseline": baseline}),
                     space_path=str(path), objectives=list(space.objectives), world_size=1)
        study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'w.db'}"),
                                              f"w{len(why)}", s)
        assert search.enqueue_baseline(study, s).startswith(why)
        assert study.get_trials(deepcopy=False) == []


def test_a_worker_that_stops_sending_heartbeats_anywhere_has_its_trial_closed_and_retried_once(fingerprint, tmp_path):
    from cotune.study import open_storage

    s = settings(fingerprint, tmp_path, budget=3)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = search.create_or_resume_study(open_storage(url, dead_after_s=2), "t", s)
    # A worker on another host launched a trial, beat once, then vanished (its host went down).
    lost = study.ask()
    # The lost trial's params, as its worker asked them before launching.
    knobs = derive.suggest(lost, s.space, s.native_precisions, study.user_attrs.get("precision_choices"),
                           world_size=s.world_size)
    lost.set_user_attr("host", "a-host-that-died")
    lost.set_user_attr("search_pid", 1)
    lost.set_user_attr("launched", True)
    study._storage.record_heartbeat(lost._trial_id)
    assert workers.launched(study.get_trials()) == 1  # it counts while it might still run
    time.sleep(3.5)
    runs = []
    progress = search.run_search(study, s, lambda c, d: runs.append(c) or fake_trial(c, d))
    trials = study.get_trials()
    assert trials[0].user_attrs["status"] == "interrupted"
    assert "sent no heartbeat for 2 s" in trials[0].user_attrs["reason"]
    retry = trials[1]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == trials[0].params
    assert derive.knobs_of_params(retry.params) == derive.knobs_of_params(trials[0].params) and knobs
    assert progress.done == 3 and len(runs) == 3  # the retry and two more: the budget, exactly
    # Each trial this worker ran beat its heartbeat; none is left running.
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def _take_and_close(url: str, start: float, dead_id: int, out) -> None:
    """One worker at ``start``: ask twice, and close the dead worker's trial."""
    study = optuna.load_study(study_name="q", storage=url)
    while time.time() < start:
        pass
    closed = workers._worker_died(study, study._storage.get_trial(dead_id), "its search died")
    out.put(([workers.ask(study).number for _ in range(2)], closed))


@pytest.mark.multiprocess
def test_workers_on_one_sqlite_file_take_each_queued_trial_and_close_each_dead_one_once(tmp_path):
    # SQLite ignores the FOR UPDATE that Optuna's queue relies on: four workers asking at the same instant
    # took the one queued baseline twice in half the rounds (two workers ran and recorded trial 0).
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(6):
        url = f"sqlite:///{tmp_path / f'q{round_}.db'}"
        study = optuna.create_study(study_name="q", storage=url)
        dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        dead.set_user_attr("launched", True)
        for x in (0.1, 0.2, 0.3):
            study.enqueue_trial({"x": x})
        out, start = ctx.Queue(), time.time() + 1.5
        procs = [ctx.Process(target=_take_and_close, args=(url, start, dead._trial_id, out)) for _ in range(4)]
        for p in procs:
            p.start()
        got = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        taken = [n for numbers, _ in got for n in numbers]
        assert len(taken) == len(set(taken)) == 8, got  # no trial handed to two workers
        assert sum(closed for _, closed in got) == 1  # the dead trial closed by one worker, its retry queued once
        trials = study.get_trials(deepcopy=False)
        assert [t.user_attrs.get("retry_of") for t in trials].count(0) == 1
        assert {t.number for t in trials if t.params.get("x") in (0.1, 0.2, 0.3)} <= set(taken)
