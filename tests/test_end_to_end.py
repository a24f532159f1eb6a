"""`cotune search` for real on CPU: real trials, a real SQLite study, then the reading commands."""

from __future__ import annotations

import json

import optuna
import pytest

from cotune.config import STATUSES, TrialConfig
from tests.conftest import run_cli
from tests.test_derive import ran_knobs


@pytest.mark.slow
def test_search_budget_4_then_resume_trials_best_and_trial(tmp_path):
    result = run_cli("search", "--budget", "4", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Pareto set of cpu-tiny-gpt" in result.stdout
    assert "trial 0 runs the space's baseline config" in result.stdout

    study = optuna.load_study(study_name="cpu-tiny-gpt", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    trials = study.get_trials()
    assert len(trials) == 4
    from cotune.report import report_info

    assert trials[0].user_attrs["baseline"] is True and report_info(study).baseline_trial in (0, None)
    if trials[0].user_attrs["status"] == "ok":
        assert report_info(study).baseline_trial == 0  # measured: every report shows the speedup over it
    ok = [t for t in trials if t.user_attrs["status"] == "ok"]
    assert len(ok) >= 3, [(t.user_attrs["status"], t.user_attrs["reason"]) for t in trials]
    for t in trials:
        assert t.user_attrs["status"] in STATUSES
        # What Optuna was told is what ran: every param is the value in the trial's recorded config.
        flat = TrialConfig.from_dict(t.user_attrs["config"]).flat()
        assert t.params and {k: flat[k] for k in ran_knobs(t.params)} == ran_knobs(t.params)
    for t in ok:
        m = t.user_attrs["metrics"]
        assert t.values == [m["tokens_per_second"], m["val_loss"]]
        assert m["tokens_per_second"] > 0 and 0 < m["val_loss"] < 5.6  # below ln(256): it learned
        assert m["peak_memory_bytes"] > 0 and 0 < m["mfu"] < 1 and m["step_time_std_s"] >= 0
        assert len(t.user_attrs["loss_curve"]) >= 2
        assert (tmp_path / "cotune-runs" / "cpu-tiny-gpt" / f"trial-{t.number:04d}" / "result.json").exists()

    again = run_cli("search", "--budget", "4", cwd=tmp_path)
    assert again.returncode == 0 and "budget of 4 is spent" in again.stdout
    more = run_cli("search", "--budget", "5", "--profile", cwd=tmp_path)
    assert more.returncode == 0 and "running 1 more" in more.stdout
    study = optuna.load_study(study_name="cpu-tiny-gpt", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    assert len(study.trials) == 5
    profiled = study.trials[4].user_attrs
    if profiled["status"] == "ok":  # the profiler's top ops and its Chrome trace as an Optuna artifact
        assert profiled["profile_top_ops"] and {"name", "self_time_ms", "calls", "percent"} <= set(
            profiled["profile_top_ops"][0])
        artifact = tmp_path / "cotune-artifacts" / "cpu-tiny-gpt" / profiled["trace_artifact_id"]
        assert artifact.stat().st_size > 1000

    listing = run_cli("trials", cwd=tmp_path)
    assert listing.returncode == 0 and "cpu-tiny-gpt: 5 trials" in listing.stdout
    front = run_cli("best", cwd=tmp_path)
    assert front.returncode == 0 and "Pareto set" in front.stdout

    # The config a trial recorded runs again by hand and is the same config.
    config_path = tmp_path / "chosen.json"
    config_path.write_text(json.dumps(ok[0].user_attrs["config"]))
    by_hand = run_cli("trial", str(config_path), "--out", str(tmp_path / "by-hand"), cwd=tmp_path)
    assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
    assert "tokens_per_second" in by_hand.stdout and "val_loss" in by_hand.stdout
    assert TrialConfig.load(tmp_path / "by-hand" / "config.json") == TrialConfig.from_dict(ok[0].user_attrs["config"])


@pytest.mark.slow
@pytest.mark.parametrize("space", ["cpu-llama-tiny", "cpu-bert-mlm"])
def test_hugging_face_spaces_search_report_and_export(tmp_path, space):
    """A transformers Llama (next token) and BERT (masked LM) with a trained BPE, searched, reported, exported."""
    from tests.conftest import ROOT

    path = ROOT / "search_spaces" / f"{space}.yaml"
    result = run_cli("search", "--space", str(path), "--budget", "3", "--seed", "2", "--sampler", "random",
                     "--report", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    study = optuna.load_study(study_name=space, storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    ok = [t for t in study.trials if t.user_attrs["status"] == "ok"]
    assert len(ok) >= 2, [(t.user_attrs["status"], t.user_attrs["reason"]) for t in study.trials]
    model = "hf:llama" if space == "cpu-llama-tiny" else "hf:bert"
    assert study.user_attrs["workload"]["model"] == model
    data = study.user_attrs["data"]  # the study says where its tokens and tokenizer came from
    assert data["vocab_size"] == 2048 and "BPE 2048" in data["source"]
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(data["tokenizer_dir"])) == 2048
    for t in ok:
        workload = t.user_attrs["config"]["workload"]
        assert workload["model"] == model and workload["vocab_size"] == 2048 and workload["tokenizer"] == "bpe:2048"
        assert workload["objective"] == ("causal_lm" if model == "hf:llama" else "masked_lm")
        assert 0 < t.user_attrs["metrics"]["val_loss"] < 7.7  # below ln(2048): it learned
    page = (tmp_path / "reports" / f"{space}.html").read_text()
    shape = {"cpu-llama-tiny": "hf:llama: 4 layers, 64 wide, 4 heads (2 key/value), T=64, next token, vocab 2048",
             "cpu-bert-mlm": "hf:bert: 4 layers, 64 wide, 4 heads, T=64, masked LM, vocab 2048"}[space]
    assert shape in page  # the shape read off the model, not the space's config fields
    for fmt in ("json", "hf", "lightning", "deepspeed", "torchtitan", "torchtitan-toml", "accelerate", "megatron"):
        exported = run_cli("export", "--format", fmt, cwd=tmp_path)
        assert exported.returncode == 0, fmt + exported.stderr
        assert exported.stdout.strip(), fmt
