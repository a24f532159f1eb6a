"""The README's own-model example, read from the README itself, runs through `cotune search`.

The model module and the space are the two code blocks of "Your own model" that start with
``# my_model.py`` and ``# my-space.yaml``; the search runs in a folder holding just them.
"""

from __future__ import annotations

import json
import re
import sqlite3

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def readme_block(first_line: str) -> str:
    """The fenced code block of README.md whose first line is ``first_line``."""
    blocks = re.findall(r"```\w*\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(first_line + "\n") or b.startswith(first_line + ":")]
    assert len(found) == 1, f"README.md has {len(found)} blocks starting with {first_line!r}"
    return found[0]


def test_the_readme_example_model_is_tuned_by_cotune_search(tmp_path):
    (tmp_path / "my_model.py").write_text(readme_block("# my_model.py"))
    (tmp_path / "my-space.yaml").write_text(readme_block("# my-space.yaml"))
    result = run_cli("search", "--space", "my-space.yaml", "--budget", "8", "--sampler", "random", "--seed", "4",
                     cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    rows = sqlite3.connect(tmp_path / "cotune.db").execute(
        "select t.number, a.key, a.value_json from trials t join trial_user_attributes a using (trial_id) "
        "where a.key in ('status', 'config', 'reason')").fetchall()
    trials: dict[int, dict] = {}
    for number, key, value in rows:
        trials.setdefault(number, {})[key] = json.loads(value)
    assert len(trials) == 8
    ok = [t for t in trials.values() if t["status"] == "ok"]
    assert len(ok) >= 4, trials
    layouts = {(t["config"]["parallel"]["dp"], t["config"]["parallel"]["tp"]) for t in ok}
    assert (1, 1) in layouts and len(layouts) >= 2, layouts  # one process, and at least one two-process layout
    for t in trials.values():
        if t["status"] != "ok":  # only pipeline trials may fail, and they are never launched
            assert t["status"] == "infeasible" and t["reason"] == (
                "pp=2 cannot run on my_model:build: TinyLM has no pipeline stage cutter (Workload.stage)"), t


def test_a_tp2_trial_of_the_readme_model_matches_one_process(tmp_path, monkeypatch):
    """Its plan really shards: tp2 trains exactly as one process does (and would fail if a key matched nothing)."""
    from dataclasses import replace

    from cotune import runner
    from cotune.config import (
        BatchConfig,
        OptimizerConfig,
        ParallelConfig,
        RunConfig,
        TrialConfig,
        WorkloadConfig,
    )
    from cotune.data import default_cache_dir

    (tmp_path / "my_model.py").write_text(readme_block("# my_model.py"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the trial processes import my_model from there

    base = TrialConfig(
        workload=WorkloadConfig(model="my_model:build", n_layer=2, n_embd=32, n_head=4, seq_len=32),
        batch=BatchConfig(micro_batch_size=4, global_batch_size=8, grad_accum_steps=2),
        optimizer=OptimizerConfig(learning_rate=1e-2, warmup_fraction=0.0),
        run=RunConfig(token_budget=6 * 8 * 32, warmup_steps=1, measured_steps=2, eval_tokens=1024, timeout_s=180),
    )
    losses = {}
    for name, par in {"one": ParallelConfig(), "tp2": ParallelConfig(tp=2)}.items():
        result = runner.launch_trial(replace(base, parallel=par), tmp_path / name, cache_dir=default_cache_dir())
        assert result.status == "ok", result.reason + result.error_tail
        losses[name] = [step[2] for step in result.loss_curve]
    assert losses["tp2"] == pytest.approx(losses["one"], rel=1e-5, abs=1e-5)
