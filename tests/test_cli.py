"""The command line as a user meets it: bad input is one sentence, exit 2, nothing written."""

from __future__ import annotations

import json
from dataclasses import replace

import optuna
import pytest

from cotune.config import KernelConfig, OptimizerConfig, TrialConfig
from cotune.report import report_info
from cotune.study import rows
from tests.conftest import CPU_SPACE, ROOT, run_cli

BAD_SPACES = {
    "invalid-yaml.yaml": ("name: x\nknobs: {a: [\n", "not valid YAML at line"),
    "unknown-knob.yaml": (CPU_SPACE.read_text().replace("adam_beta2:", "adam_beta3:"), "unknown knob 'adam_beta3'"),
    "empty-domain.yaml": (CPU_SPACE.read_text().replace("choices: [4, 8, 16, 32]", "choices: []"),
                          "knobs.micro_batch_size: choices is empty"),
    "inverted-domain.yaml": (CPU_SPACE.read_text().replace("{low: 1.0e-4, high: 3.0e-2, log: true}",
                                                           "{low: 3.0e-2, high: 1.0e-4, log: true}"),
                             "knobs.learning_rate: low must be <= high"),
}


LLAMA_SPACE = ROOT / "search_spaces" / "cpu-llama-tiny.yaml"
# Bad input about the user's own model and data, found when the search builds the model or reads the data.
BAD_WORKLOADS = {
    "unknown-model-type.yaml": (LLAMA_SPACE.read_text().replace("model: hf:llama", "model: hf:lama"),
                                "'hf:lama' is not a transformers model type (did you mean llama"),
    "unknown-field.yaml": (LLAMA_SPACE.read_text().replace("intermediate_size:", "intermediat_size:"),
                           "workload.config.intermediat_size: llama's config has no field 'intermediat_size'"),
    "heads.yaml": (LLAMA_SPACE.read_text().replace("num_attention_heads: 4", "num_attention_heads: 6"),
                   "num_attention_heads must divide hidden_size, but got hidden_size=64, num_attention_heads=6"),
    "no-tokenizer-folder.yaml": (LLAMA_SPACE.read_text().replace("tokenizer: bpe:2048", "tokenizer: ./no-such-tok"),
                                 "no-such-tok"),
    "jsonl-without-field.yaml": (LLAMA_SPACE.read_text().replace("data: builtin:stdlib-docstrings",
                                                                  "data: docs.jsonl\n  data_field: body"), "'body'"),
    "empty-data.yaml": (LLAMA_SPACE.read_text().replace("data: builtin:stdlib-docstrings", "data: empty.txt"),
                        "empty.txt"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BAD_WORKLOADS))
def test_bad_model_or_data_is_one_sentence_and_writes_no_study(tmp_path, name):
    text, expected = BAD_WORKLOADS[name]
    (tmp_path / name).write_text(text)
    (tmp_path / "docs.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    assert_user_error(run_cli("search", "--space", name, cwd=tmp_path), expected)
    assert not (tmp_path / "cotune.db").exists()


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("name", sorted(BAD_SPACES))
def test_bad_space_file(tmp_path, name):
    text, expected = BAD_SPACES[name]
    (tmp_path / name).write_text(text)
    assert_user_error(run_cli("search", "--space", name, cwd=tmp_path), name, expected)
    assert_user_error(run_cli("spaces", "--check", name, cwd=tmp_path), name, expected)
    assert not (tmp_path / "cotune.db").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--sampler", "annealing"], ["--sampler", "'tpe', 'nsga2', 'gp', 'random'"]),
        (["--budget", "0"], ["--budget", "greater than or equal to 1"]),
        (["--budget", "-3"], ["--budget"]),
        (["--storage", "cotune.db"], ["--storage 'cotune.db' is not a database URL", "sqlite:///cotune.db"]),
        (["--storage", "nosuchdb://host/x"], ["--storage 'nosuchdb://host/x' is not a database URL Optuna can use"]),
        (["--storage", "sqlite:///no/such/folder/c.db"], ["--storage", "the folder no/such/folder does not exist"]),
        (["--objectives", "speed,loss"], ["--objectives 'speed,loss'", "tokens_per_second"]),
        (["--space", "nope.yaml"], ["nope.yaml: no such search-space file"]),
        (["--space", str(CPU_SPACE), "--data", "missing.txt"], ["missing.txt"]),
        (["--space", str(ROOT / "search_spaces" / "gpu-1-llama-1b.yaml")], ["hardware.device is cuda"]),
    ],
)
def test_bad_flags(tmp_path, args, fragments, fingerprint):
    if "cuda" in fragments[0] and fingerprint["hardware"]["gpu_count"]:
        pytest.skip("this machine has a GPU, so a cuda space is valid here")
    assert_user_error(run_cli("search", *args, cwd=tmp_path), *fragments)
    assert list(tmp_path.iterdir()) == [], "a rejected search must leave nothing behind"


def test_bad_input_leaves_an_existing_study_untouched(tmp_path):
    db = tmp_path / "cotune.db"
    storage = f"sqlite:///{db}"
    optuna.create_study(study_name="cpu-tiny-gpt", storage=storage, directions=["maximize", "minimize"])
    before = db.read_bytes()
    result = run_cli("search", "--space", str(CPU_SPACE), "--data", "missing.bin", "--storage", storage, cwd=tmp_path)
    assert_user_error(result, "missing.bin")
    assert db.read_bytes() == before


def test_trial_command_rejects_a_bad_config(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"batch": {}}))
    assert_user_error(run_cli("trial", "bad.json", cwd=tmp_path), "bad.json", "config")
    (tmp_path / "broken.json").write_text("{")
    assert_user_error(run_cli("trial", "broken.json", cwd=tmp_path), "broken.json: not valid JSON")


def test_listing_and_reading_need_a_study(tmp_path):
    # Reading never creates a database where the user mistyped a path (or ran no search yet).
    for command in (["trials"], ["best"], ["report"], ["export", "--format", "json"], ["confirm"]):
        assert_user_error(run_cli(*command, cwd=tmp_path), "there is no database file cotune.db")
        assert not (tmp_path / "cotune.db").exists()
    optuna.create_study(study_name="x", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    optuna.delete_study(study_name="x", storage=f"sqlite:///{tmp_path / 'empty.db'}")
    assert_user_error(run_cli("trials", "--storage", f"sqlite:///{tmp_path / 'empty.db'}", cwd=tmp_path),
                      "holds no study yet")
    optuna.create_study(study_name="a", storage=f"sqlite:///{tmp_path / 'cotune.db'}")
    assert_user_error(run_cli("best", "--study", "b", cwd=tmp_path), "--study 'b' is not in", "studies there: a")


def test_spaces_lists_the_shipped_ones(tmp_path):
    result = run_cli("spaces", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("cpu-tiny-gpt", "cpu-llama-tiny", "cpu-bert-mlm", "gpu-1-llama-1b", "gpu-8-llama-8b"):
        assert name in result.stdout
    ok = run_cli("spaces", "--check", str(CPU_SPACE), cwd=tmp_path)
    assert ok.returncode == 0 and "valid space 'cpu-tiny-gpt'" in ok.stdout


# Two ok trials, one with the MLP kernel in Triton, and one infeasible trial never built. Their Optuna parameter
# names are not knob names (a layout parameter, a conditional name), and a parameter's value is not what ran.
TRITON = TrialConfig(kernels=KernelConfig(mlp="triton", mlp_block_m=32), optimizer=OptimizerConfig(learning_rate=2e-3))
TORCH = replace(TRITON, kernels=KernelConfig())
NEVER_BUILT = {"micro_batch_size": 64, "global_batch_size": 32, "learning_rate": 1e-2}


def _kernel_study(tmp_path) -> tuple[str, optuna.Study]:
    storage = f"sqlite:///{tmp_path / 'cotune.db'}"
    study = optuna.create_study(study_name="k", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["tokens_per_second", "val_loss"])
    layout = optuna.distributions.CategoricalDistribution(["dp1", "tp2"])
    micro = optuna.distributions.CategoricalDistribution([4, 8, 64])
    for config, values, params in [(TRITON, [300.0, 3.0], {"layout": "tp2", "micro_batch_size|kernels=triton": 4}),
                                   (TORCH, [200.0, 2.5], {"layout": "tp2", "micro_batch_size|kernels=torch": 4})]:
        metrics = {"tokens_per_second": values[0], "val_loss": values[1], "peak_memory_bytes": 2**24}
        study.add_trial(optuna.trial.create_trial(
            values=values, params=params, distributions={k: layout if k == "layout" else micro for k in params},
            user_attrs={"status": "ok", "config": config.to_dict(), "knobs": {}, "metrics": metrics}))
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, params={"layout": "tp2"}, distributions={"layout": layout},
        user_attrs={"status": "infeasible", "config": None, "knobs": NEVER_BUILT, "reason": "too big"}))
    return storage, study


def _table_line(output: str, number: int) -> str:
    """The row of trial ``number`` in a rich table printed to ``output``."""
    return next(line for line in output.splitlines() if [c.strip() for c in line.split("│")[1:2]] == [str(number)])


def test_best_shows_the_kernel_knobs_a_trial_ran(tmp_path):
    storage, _ = _kernel_study(tmp_path)
    best = run_cli("best", "--storage", storage, cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    header = next(line for line in best.stdout.splitlines() if "tokens/s" in line)
    assert "mlp_kernel" in header and "mlp_block_m" in header, best.stdout
    assert "triton" in _table_line(best.stdout, 0) and "32" in _table_line(best.stdout, 0)
    assert "torch" in _table_line(best.stdout, 1) and "triton" not in _table_line(best.stdout, 1)
    # What is the same in both rows is listed once, kernels included; no Optuna parameter name shows.
    assert "cross_entropy_kernel=torch" in best.stdout and "micro=8" in best.stdout
    assert "layout" not in best.stdout and "tp2" not in best.stdout


def test_report_best_and_trials_agree_on_a_trials_knobs(tmp_path):
    storage, study = _kernel_study(tmp_path)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    expected = [TRITON.flat(), TORCH.flat(), NEVER_BUILT]
    assert expected[0]["mlp_kernel"] == "triton" and expected[0]["world_size"] == 1
    frame = report_info(study).frame
    assert [r.knobs for r in rows(trials)] == [frame.at[n, "effective"] for n in frame.index] == expected
    listed = run_cli("trials", "--storage", storage, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header = next(line for line in listed.stdout.splitlines() if "tokens/s" in line)
    assert "mlp_kernel" in header and "micro" in header and "lr" in header, listed.stdout
    assert "triton" in _table_line(listed.stdout, 0) and "triton" not in _table_line(listed.stdout, 1)
    assert "64" in _table_line(listed.stdout, 2) and "0.01" in _table_line(listed.stdout, 2)
    assert "layout" not in listed.stdout and "tp2" not in listed.stdout
