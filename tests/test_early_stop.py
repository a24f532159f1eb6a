"""Early stopping by Pareto rank at rungs: the rule alone, a real trial stopped at a rung, and a search's records."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna
import pytest

from cotune import early_stop, search
from cotune.config import RunConfig, TrialConfig, TrialResult
from cotune.early_stop import Halving, front_index, stop_reason
from cotune.study import pareto_trials
from tests.test_search import fake_trial, settings, study_for

OBJ = ["tokens_per_second", "val_loss"]


def at_rung(tps: float, loss: float, rung: int = 0) -> dict:
    return {"rung": rung, "step": 10, "tokens": 640, "tokens_per_second": tps, "val_loss": loss}


def test_fronts_follow_each_objectives_direction():
    # minimised tuples: (-throughput, loss)
    points = [(-100.0, 3.0), (-50.0, 2.0), (-40.0, 3.5), (-100.0, 3.0), (-10.0, 4.0)]
    assert front_index(points) == [0, 0, 1, 0, 2]


def test_a_trial_goes_on_while_fewer_than_eta_reached_its_rung():
    assert stop_reason(at_rung(1, 9.0), [at_rung(100, 1.0)], OBJ, eta=3) == ""


def test_a_dominated_trial_stops_and_a_trade_off_goes_on():
    peers = [at_rung(100, 2.0), at_rung(90, 2.1), at_rung(80, 2.2), at_rung(70, 2.3), at_rung(60, 2.4)]
    why = stop_reason(at_rung(50, 2.5), peers, OBJ, eta=3)
    assert why.startswith("stopped at rung 1 (640 tokens): 5 of the 6 trials that reached it rank on better")
    assert "only the top 2 (1/3) go on" in why
    assert stop_reason(at_rung(50, 1.9), peers, OBJ, eta=3) == ""  # slower but lower loss: on the front
    assert stop_reason(at_rung(200, 9.0), peers, OBJ, eta=3) == ""  # fastest: on the front
    # Front 1 (only the leader dominates it) is still within the top ceil(6/3) = 2 ...
    assert stop_reason(at_rung(95, 2.05), [at_rung(100, 2.0), *[at_rung(1, 2.5 + i) for i in range(4)]],
                       OBJ, eta=3) == ""
    # ... and a higher eta keeps fewer.
    assert stop_reason(at_rung(95, 2.05), [at_rung(100, 2.0), *[at_rung(1, 2.5 + i) for i in range(4)]],
                       OBJ, eta=6) != ""


def test_a_diverging_rung_loss_stops_and_a_missing_objective_decides_nothing():
    assert "not a finite number" in stop_reason(at_rung(100, math.nan), [], OBJ, eta=3)
    assert stop_reason({"rung": 0, "tokens": 1, "val_loss": 9.0}, [at_rung(100, 1.0)] * 5,
                       ["tokens_per_second", "val_loss"], eta=3) == ""


def test_rung_summary_takes_each_objective_from_the_record():
    record = {"rung": 1, "step": 12, "tokens": 768, "val_loss": 2.5,
              "metrics": {"tokens_per_second": 1234.0, "peak_memory_bytes": 99, "rung_val_loss": 2.5}}
    assert early_stop.rung_summary(record, ["tokens_per_second", "val_loss", "peak_memory"]) == {
        "rung": 1, "step": 12, "tokens": 768, "tokens_per_second": 1234.0, "val_loss": 2.5, "peak_memory": 99}


def test_halving_rejects_rungs_outside_the_budget():
    with pytest.raises(ValueError, match="eta >= 2"):
        Halving(eta=1)
    with pytest.raises(ValueError, match=r"lie in \(0, 1\)"):
        Halving(fractions=(0.5, 1.0))


# ------------------------------------------------------------------ a search that stops trials

def rung_trial(config: TrialConfig, trial_dir: Path, on_rung=None) -> TrialResult:
    """fake_trial's numbers, reported at each rung as a real trial does; stopped where on_rung says."""
    full = fake_trial(config, trial_dir)
    if full.status != "ok":
        return full
    tps, loss = full.metrics["tokens_per_second"], full.metrics["val_loss"]
    for i, f in enumerate(config.run.rung_fractions):
        rung_loss = loss + (1 - f)  # a rung's loss is higher, in the same order as the final one
        record = {"rung": i, "step": i + 1, "tokens": int(f * 1000), "val_loss": rung_loss,
                  "metrics": {"tokens_per_second": tps, "rung_val_loss": rung_loss}, "phase_seconds": {},
                  "loss_curve": []}
        why = on_rung(json.loads(json.dumps(record)))
        if why:
            return TrialResult("pruned", metrics=record["metrics"], reason=why)
    return full


def test_a_search_records_stopped_trials_as_pruned_and_never_on_the_front(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=30, early_stopping=Halving())
    study = study_for(tmp_path, s)
    assert search.enqueue_baseline(study, s) == ""
    progress = search.run_search(study, s, rung_trial)
    trials = study.get_trials()
    assert progress.done == 30 and len([t for t in trials if t.user_attrs["status"] != "infeasible"]) == 30
    pruned = [t for t in trials if t.user_attrs["status"] == "pruned"]
    assert pruned, "a search of 30 with eta = 3 stops some trials"
    for t in pruned:
        assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs["reason"].startswith("stopped at rung")
        assert t.user_attrs["rungs"][-1]["val_loss"] == t.user_attrs["metrics"]["rung_val_loss"]
        assert t.user_attrs["config"]["run"]["rung_fractions"] == list(Halving().fractions)
    assert trials[0].user_attrs["baseline"] and trials[0].user_attrs["status"] != "pruned"
    front = {t.number for t in pareto_trials(study)}
    assert front and not front & {t.number for t in pruned}
    done = [t for t in trials if t.user_attrs["status"] == "ok"]
    assert all(len(t.user_attrs["rungs"]) == 2 for t in done)


def test_without_early_stopping_a_trial_reports_no_rungs(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=4)
    study = study_for(tmp_path, s)
    search.run_search(study, s, fake_trial)  # fake_trial takes no on_rung: it would fail if given one
    assert all("rungs" not in t.user_attrs and t.user_attrs["config"]["run"]["rung_fractions"] == []
               for t in study.get_trials())


def test_a_config_written_before_rungs_existed_still_loads():
    data = TrialConfig().to_dict()
    del data["run"]["rung_fractions"]
    assert TrialConfig.from_dict(data).run.rung_fractions == ()
    assert TrialConfig.from_dict(TrialConfig(run=RunConfig(rung_fractions=[0.25])).to_dict()).run.rung_fractions \
        == (0.25,)
    assert dataclasses.asdict(TrialConfig())["run"]["rung_fractions"] == ()


# ------------------------------------------------------------------ a real trial at its rungs

def test_rungs_fall_on_the_same_share_of_tokens_and_never_inside_the_timed_window():
    from cotune.trial.train import rung_steps
    from tests.test_trial import BASE, with_

    # 40 steps to the budget, the timed window ends after step 6.
    assert rung_steps(with_(BASE, run={"rung_fractions": (1 / 9, 1 / 3)})) == {14: 1}  # ceil(40/9) = 5 < 6: skipped
    assert rung_steps(with_(BASE, run={"rung_fractions": (1 / 9, 1 / 3), "warmup_steps": 1})) == {5: 0, 14: 1}
    assert rung_steps(with_(BASE, run={"rung_fractions": (0.999,)})) == {}  # the last step: the trial's own loss
    assert rung_steps(BASE) == {}

@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "cotune-builtin-cache"


@pytest.mark.slow
def test_a_real_trial_reports_each_rung_and_a_stopped_one_ends_there(tmp_path, cache):
    from cotune.runner import ForkServer, launch_trial
    from cotune.trial.train import rung_steps
    from tests.test_trial import BASE, with_

    # 200 steps, rungs after steps 25 and 100: the 175 steps after the first outlast the runner's look (every 0.1 s).
    # A generous timeout: on a loaded machine (CI beside other work) 200 steps can take minutes.
    config = with_(BASE, run={"rung_fractions": (1 / 8, 1 / 2), "token_budget": 8 * 64 * 200, "timeout_s": 600})
    assert rung_steps(config) == {25: 0, 100: 1}
    heard: list[dict] = []
    full = launch_trial(config, tmp_path / "full", cache_dir=cache, on_rung=lambda r: heard.append(r) or "")
    assert full.status == "ok", full.reason + full.error_tail
    assert [(r["rung"], r["step"], r["tokens"]) for r in heard] == [(0, 25, 25 * 512), (1, 100, 100 * 512)]
    # The timed window ended before the first rung: the rung's throughput is the trial's.
    assert all(r["metrics"]["tokens_per_second"] == full.metrics["tokens_per_second"] for r in heard)
    assert all(0 < r["val_loss"] < 6 and "val_loss" not in r["metrics"] for r in heard)
    assert full.phase_seconds["rung_eval"] > 0

    with ForkServer(tmp_path / "server.log") as server:  # a warm start, as `cotune search` runs it
        stopped = launch_trial(config, tmp_path / "stopped", cache_dir=cache, fork_server=server,
                               on_rung=lambda r: "enough" if r["rung"] == 0 else "")
    assert stopped.status == "pruned" and stopped.reason == "enough"
    assert stopped.metrics["tokens_trained"] == 25 * 512 and stopped.metrics["train_steps"] == 25
    assert stopped.metrics["rung_val_loss"] == pytest.approx(heard[0]["val_loss"], rel=1e-6)  # same seed, same run
    assert stopped.loss_curve[-1][0] == 25 and stopped.phase_seconds["rung_eval"] > 0
    assert not (tmp_path / "stopped" / "result.json").exists()  # killed at the rung, before it finished


def test_the_report_lists_stopped_trials_apart_from_failures_and_off_the_front(fingerprint, tmp_path):
    from cotune.report import report_info
    from cotune.report.render import render

    s = settings(fingerprint, tmp_path, budget=24, early_stopping=Halving())
    study = study_for(tmp_path, s)
    search.run_search(study, s, rung_trial)
    info = report_info(study)
    stopped = info.frame[info.frame["status"] == "pruned"]
    assert len(stopped) == info.status_counts["pruned"] > 0
    assert not set(stopped.index) & set(info.pareto_numbers) and not set(stopped.index) & set(info.failures.index)
    html = render(info)
    section = html[html.index('<section id="pruned">'):]
    section = section[:section.index("</section>")]
    assert section.count("<tr>") == 1 + len(stopped)  # the header and one row per stopped trial
    assert all(f">#{n}<" in section for n in stopped.index)
    assert 'href="#pruned"' in html and "stopped early" in html
