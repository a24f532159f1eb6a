"""Speed and loss apart: the keys, the plan for a proposed config, and a search that reuses what it measured."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from cotune import factorise, search
from cotune.config import (
    BatchConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    TrialConfig,
    TrialResult,
)
from cotune.factorise import loss_key, plan, throughput_key
from cotune.space import Domain
from tests.test_search import settings, study_for

BASE = TrialConfig(batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2))


def test_throughput_ignores_the_optimizer_and_the_fp32_loss_ignores_the_system():
    other_lr = replace(BASE, optimizer=OptimizerConfig(learning_rate=5e-3))
    other_layout = replace(BASE, batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=1),
                           parallel=ParallelConfig(dp=2))
    assert throughput_key(other_lr) == throughput_key(BASE) != throughput_key(other_layout)
    assert loss_key(other_layout) == loss_key(BASE) != loss_key(other_lr)
    assert loss_key(replace(BASE, precision=PrecisionConfig("bf16"))) is None  # rounding differs by layout
    assert loss_key(replace(BASE, run=replace(BASE.run, seed=7))) != loss_key(BASE)


def record(number: int, config: TrialConfig, tps: float, measured=None) -> dict:
    """A study's ok trial as the plan reads it; its whole run took 10000 / tps seconds."""
    return factorise.measured_records([type("T", (), {"number": number, "user_attrs": {
        "status": "ok", "config": config.to_dict(), "metrics": {"tokens_per_second": tps},
        "phase_seconds": {"process_wall": 10000 / tps}, **({"measured": measured} if measured else {})}})])[0]


def test_the_plan_runs_only_what_the_study_has_not_measured():
    slow = replace(BASE, parallel=ParallelConfig(dp=1), batch=BatchConfig(micro_batch_size=2, global_batch_size=8,
                                                                          grad_accum_steps=4))
    new_lr = replace(slow, optimizer=OptimizerConfig(learning_rate=5e-3))
    assert plan(BASE, []) == factorise.Plan(None, None, BASE)  # nothing known: a whole trial
    known = [record(0, BASE, 1000.0), record(1, slow, 400.0)]
    assert plan(slow, known) == factorise.Plan(1, 0, None)  # both measured (the loss by trial 0): nothing runs
    p = plan(new_lr, known)  # a new loss on a known, slow system: trained on trial 0's quicker layout
    assert (p.throughput_from, p.loss_from, p.loss_layout_from) == (1, None, 0) and not p.measure_only
    assert p.run.batch == BASE.batch and p.run.optimizer == new_lr.optimizer
    p = plan(replace(BASE, optimizer=OptimizerConfig(learning_rate=5e-3)), known)  # the fastest's own: as usual
    assert p == factorise.Plan(None, None, replace(BASE, optimizer=OptimizerConfig(learning_rate=5e-3)))
    p = plan(replace(slow, batch=BatchConfig(micro_batch_size=8, global_batch_size=8, grad_accum_steps=1)), known)
    assert (p.throughput_from, p.loss_from) == (None, 0) and p.measure_only  # a new system, a known loss
    reused = [record(0, BASE, 1000.0, measured={"throughput": "here", "loss": 3})]
    assert plan(BASE, reused).loss_from is None  # a loss reused from elsewhere is not a source itself
    # A measure-only run's wall time is no whole trial's: its layout is never picked to train a loss on.
    short = [record(0, BASE, 1000.0, measured={"throughput": "here", "loss": 5}), record(1, slow, 400.0)]
    assert plan(new_lr, short) == factorise.Plan(None, None, new_lr)
    # Quicker per token but slower to run whole (more processes to start): not picked.
    two = [{**record(0, BASE, 1000.0), "whole_s": 30.0}, record(1, slow, 400.0)]
    assert plan(new_lr, two) == factorise.Plan(None, None, new_lr)
    bf16 = replace(BASE, precision=PrecisionConfig("bf16"))
    assert plan(bf16, [record(0, bf16, 900.0)]) == factorise.Plan(None, None, bf16)  # no loss reuse in bf16


# ------------------------------------------------------------------ a search

RAN: list[TrialConfig] = []


def factorised_trial(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Throughput from the system knobs only, loss from the algorithm knobs only: as the gate says of fp32."""
    RAN.append(config)
    k = config.flat()
    tps = 1000.0 * k["micro_batch_size"] / (1.5 if k["activation_checkpointing"] else 1.0) / k["world_size"] ** 0.5
    metrics = {"tokens_per_second": tps, "step_time_mean_s": 8 * 64 / tps, "peak_memory_bytes": 1e6 * k["micro_batch_size"]}
    wall = {"process_wall": 2.0 + 20 * 512 / tps}  # a start, then the steps
    if config.run.measure_only:
        return TrialResult("ok", metrics=metrics, loss_curve=[[1, 512, 5.0]], phase_seconds=wall)
    loss = 2.0 + (math.log10(k["learning_rate"]) + 2.5) ** 2 + 0.01 * k["global_batch_size"] + 0.001 * config.run.seed
    wall["process_wall"] += 100 * 512 / tps  # the rest of the budget
    return TrialResult("ok", metrics={**metrics, "val_loss": loss}, loss_curve=[[1, 512, 5.0], [2, 1024, loss]],
                       phase_seconds=wall)


def test_a_factorised_search_records_exactly_what_whole_trials_would_and_runs_less(fingerprint, tmp_path):
    s = settings(fingerprint, tmp_path, budget=40, factorise=True, sampler="random")
    # Few systems and some repeated algorithms, so every case of the plan comes up within 40 trials.
    knobs = {**s.space.knobs, "learning_rate": Domain(choices=[1e-3 * (1 + i) for i in range(30)]),
             "global_batch_size": Domain(choices=[8, 16]), "micro_batch_size": Domain(choices=[4, 8]),
             "activation_checkpointing": Domain(choices=[False]), "warmup_fraction": Domain(choices=[0.05]),
             "weight_decay": Domain(choices=[0.1]), "adam_beta2": Domain(choices=[0.99]),
             "precision": Domain(choices=["fp32"])}
    s = settings(fingerprint, tmp_path, budget=40, factorise=True, sampler="random",
                 space=s.space.model_copy(update={"knobs": knobs}))
    study = study_for(tmp_path, s)
    RAN.clear()
    search.run_search(study, s, factorised_trial)
    trials = study.get_trials()
    ran = list(RAN)
    assert len(trials) == 40
    for t in trials:
        whole = factorised_trial(TrialConfig.from_dict(t.user_attrs["config"]), tmp_path)  # what a whole trial gives
        assert t.values == [whole.metrics["tokens_per_second"], whole.metrics["val_loss"]], t.user_attrs["measured"]
    measured = [t.user_attrs["measured"] for t in trials]
    nothing_ran = [m for m in measured if m["throughput"] != "here" and m["loss"] not in ("here", "layout")]
    measure_only = [c for c in ran if c.run.measure_only]
    on_faster_layout = [m for m in measured if m["loss"] == "layout"]
    assert nothing_ran and measure_only and on_faster_layout
    assert len(ran) == 40 - len(nothing_ran)
    for m in on_faster_layout:  # trained on the layout of a trial whose whole run took less wall time
        ran = TrialConfig.from_dict(m["ran"])
        source = study.trials[m["loss_layout_from"]]
        assert ran.batch == TrialConfig.from_dict(source.user_attrs["config"]).batch
        wall = [study.trials[n].user_attrs["phase_seconds"]["process_wall"] for n in (m["loss_layout_from"], m["throughput"])]
        assert wall[0] < wall[1]


@pytest.mark.slow
def test_a_measure_only_trial_runs_the_timed_window_and_takes_no_loss(tmp_path_factory):
    from cotune.trial.train import train_and_measure
    from tests.test_trial import BASE as TRIAL
    from tests.test_trial import with_

    cache = tmp_path_factory.getbasetemp() / "cotune-builtin-cache"
    whole = train_and_measure(TRIAL, cache_dir=cache)
    short = train_and_measure(with_(TRIAL, run={"measure_only": True}), cache_dir=cache)
    assert short.status == "ok" and "val_loss" not in short.metrics and "eval" not in short.phase_seconds
    window = TRIAL.run.warmup_steps + TRIAL.run.measured_steps
    assert short.metrics["train_steps"] == window == len(short.loss_curve) < whole.metrics["train_steps"]
    # The same steps on the same schedule: the same losses, step for step.
    assert [p[2] for p in short.loss_curve] == pytest.approx([p[2] for p in whole.loss_curve[:window]], abs=1e-6)
    assert short.metrics["tokens_per_second"] > 0 and short.metrics["peak_memory_bytes"] > 0


def test_the_report_names_where_reused_values_came_from(fingerprint, tmp_path):
    from cotune.report import report_info
    from cotune.report.render import render
    from cotune.report.text import reused

    assert reused({"throughput": "here", "loss": 4}) == ["loss of #4"]
    assert reused({"throughput": 2, "loss": "layout", "loss_layout_from": 7}) == [
        "throughput of #2", "loss trained on #7's layout"]
    assert reused({"throughput": "here", "loss": "here"}) == reused(None) == []
    knobs = {"learning_rate": Domain(choices=[1e-3]), "precision": Domain(choices=["fp32"]),
             "warmup_fraction": Domain(choices=[0.05]), "weight_decay": Domain(choices=[0.1]),
             "adam_beta2": Domain(choices=[0.99])}
    base = settings(fingerprint, tmp_path)
    s = settings(fingerprint, tmp_path, budget=12, factorise=True, sampler="random",
                 space=base.space.model_copy(update={"knobs": {**base.space.knobs, **knobs}}))
    study = study_for(tmp_path, s)
    search.run_search(study, s, factorised_trial)
    info = report_info(study)
    html = render(info)
    reusing = [n for n, m in info.ok["measured"].items() if reused(m)]
    assert reusing and f"{len(reusing)} of the {len(info.ok)} ok trials took a value another trial measured" in html
    picks = html[html.index('id="picks"'):]
    picks = picks[:picks.index("</table>")]
    for n in info.picks.index:
        assert all(w.replace("'", "&#x27;") in picks for w in reused(info.frame.at[n, "measured"]))


def test_carrying_out_a_plan_composes_values_and_keeps_a_stopped_loss_run_on_its_own_throughput():
    tput = TrialResult("ok", metrics={"tokens_per_second": 500.0, "peak_memory_bytes": 7, "val_loss": 9.0},
                       loss_curve=[[1, 64, 9.5]])
    loss = TrialResult("ok", metrics={"tokens_per_second": 900.0, "val_loss": 2.5, "train_steps": 40},
                       loss_curve=[[1, 64, 4.0], [40, 2560, 2.6]])
    recorded = {3: tput, 4: loss}.__getitem__
    ran: list[TrialConfig] = []

    def run(config):
        ran.append(config)
        return TrialResult("pruned", metrics={"tokens_per_second": 900.0, "rung_val_loss": 3.0}, reason="stopped")

    result, where = factorise.run_planned(factorise.Plan(3, 4, None), run, recorded)  # nothing runs
    assert not ran and where == {"throughput": 3, "loss": 4} and result.status == "ok"
    assert result.metrics == {"tokens_per_second": 500.0, "peak_memory_bytes": 7, "val_loss": 2.5, "train_steps": 40}
    assert result.loss_curve == loss.loss_curve
    # A loss run on trial 4's quicker layout, stopped at a rung: it keeps this config's throughput and memory.
    result, where = factorise.run_planned(factorise.Plan(3, None, BASE, loss_layout_from=4), run, recorded)
    assert ran == [BASE] and result.status == "pruned" and result.metrics["tokens_per_second"] == 500.0
    assert result.metrics["peak_memory_bytes"] == 7 and result.metrics["rung_val_loss"] == 3.0
    assert where == {"throughput": 3, "loss": "layout", "loss_layout_from": 4}
