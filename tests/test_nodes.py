"""Trials larger than a machine: two "machines" of one process each on this one, met at torchrun's c10d
rendezvous — the search runs the first share, a node agent (`cotune node --rank 1`) the second."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from cotune import nodes, runner
from cotune.config import TrialConfig, TrialResult
from tests.test_workers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

TWO_MACHINES = (TINY.replace("name: cpu-tiny-gpt", "name: two-machines")
                .replace("  nproc: 2 ", "  nproc: 1\n  nnodes: 2 ")
                .replace("world_size: {choices: [1, 2]}", "world_size: {choices: [2]}")
                .replace("  world_size: 1\n", "  world_size: 2\n"))


def _cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cotune.cli", *args], cwd=cwd, env={**os.environ, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_trial_across_two_machines_trains_as_it_does_on_one(tmp_path):
    space = tmp_path / "two.yaml"
    space.write_text(TWO_MACHINES)
    assert "nnodes: 2" in TWO_MACHINES and "world_size: {choices: [2]}" in TWO_MACHINES
    agent = _cli("node", "--rank", "1", "--study", "two-machines", cwd=tmp_path)  # before the study exists
    try:
        search = _cli("search", "--space", str(space), "--budget", "2", "--seed", "0", cwd=tmp_path)
        out, _ = search.communicate(timeout=500)
        assert search.returncode == 0, out
    finally:
        agent.terminate()
        agent_out, _ = agent.communicate(timeout=60)
    assert agent.returncode == 143, agent_out
    assert "waiting for study 'two-machines'" in agent_out and "trial   0 joining as machine 1 of 2" in agent_out
    assert "trial   0 ok" in agent_out and "trial   1 ok" in agent_out  # as the search recorded them

    study = optuna.load_study(study_name="two-machines", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    trials = study.get_trials(deepcopy=False)
    assert [t.user_attrs["status"] for t in trials] == ["ok", "ok"]
    runs = tmp_path / "cotune-runs" / "two-machines"
    for t in trials:
        config = TrialConfig.from_dict(t.user_attrs["config"])
        assert config.run.nnodes == 2 and config.parallel.world_size == 2
        assert t.user_attrs["nodes"]["rendezvous"]["nnodes"] == 2
        # The agent's machine ran its share and got rank 0's result too: the same measured figures.
        copy = TrialResult.load(runs / f"trial-{t.number:04d}" / "node-1" / "result.json")
        assert copy.status == "ok" and copy.metrics["val_loss"] == t.user_attrs["metrics"]["val_loss"]
        # Rung reports (early stopping) are rank 0's on both machines too.
        rungs = [(runs / f"trial-{t.number:04d}" / where / "progress.jsonl").read_text().splitlines()
                 for where in (".", "node-1")]
        assert rungs[0] and rungs[0] == rungs[1]

    # The baseline on one machine, two processes (torchrun --standalone): the same loss at every step.
    baseline = TrialConfig.from_dict(trials[0].user_attrs["config"])
    one = replace(baseline, run=replace(baseline.run, nnodes=1))
    alone = runner.launch_trial(one, tmp_path / "one-machine", on_rung=lambda record: "")  # its rungs, not stopped
    assert alone.status == "ok", alone.reason + alone.error_tail
    across = trials[0].user_attrs["loss_curve"]
    assert [p[0] for p in alone.loss_curve] == [p[0] for p in across]
    assert [p[2] for p in alone.loss_curve] == pytest.approx([p[2] for p in across], rel=1e-5)
    assert alone.metrics["val_loss"] == pytest.approx(trials[0].user_attrs["metrics"]["val_loss"], rel=1e-5)


def test_a_machine_that_never_joins_fails_the_trial_with_the_rendezvous_named(tmp_path):
    space_config = TrialConfig()
    config = replace(space_config, parallel=replace(space_config.parallel, dp=2),
                     batch=replace(space_config.batch, grad_accum_steps=space_config.batch.global_batch_size
                                   // (2 * space_config.batch.micro_batch_size)),
                     run=replace(space_config.run, nnodes=2, timeout_s=30))
    rendezvous = nodes.new_rendezvous(2, 1, join_timeout_s=5)
    result = runner.launch_trial(config, tmp_path / "alone", rendezvous=rendezvous)
    assert result.status == "crash"
    assert result.reason.startswith(f"the trial's other 1 machine(s) did not join its rendezvous at "
                                    f"{rendezvous.endpoint} within 5 s: run `cotune node --rank R")


def test_jobs_with_trials_across_machines_is_one_error_line(tmp_path):
    space = tmp_path / "two.yaml"
    space.write_text(TWO_MACHINES)
    search = _cli("search", "--space", str(space), "--budget", "2", "--jobs", "2", cwd=tmp_path)
    out, _ = search.communicate(timeout=120)
    assert search.returncode == 2 and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: --jobs 2: ") and "hardware.nnodes 2" in out
    assert not (tmp_path / "cotune.db").exists()
