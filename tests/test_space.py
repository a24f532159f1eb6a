from __future__ import annotations

from pathlib import Path

import pytest

from cotune.errors import UserError
from cotune.space import KNOBS, default_space_path, load_space, shipped_spaces

BASE = """\
name: t
workload: {n_layer: 1, n_embd: 8, n_head: 2, seq_len: 8}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_shipped_spaces_load_and_cover_the_required_knobs():
    paths = shipped_spaces()
    names = {p.stem for p in paths}
    assert {"cpu-tiny-gpt", "cpu-llama-tiny", "cpu-bert-mlm", "gpu-1-llama-1b", "gpu-8-llama-8b"} <= names
    required = {"micro_batch_size", "global_batch_size", "precision", "learning_rate", "warmup_fraction",
                "weight_decay", "adam_beta2", "activation_checkpointing", "compile", "fsdp", "tp", "pp"}
    for path in paths:
        space = load_space(path)
        assert space.name == path.stem
        if path.stem != "cpu-triton-tiny":  # that one exists to run the Triton path, at the least cost
            assert required <= set(space.knobs), path
        if path.stem.startswith("gpu-"):  # the GPU spaces tune the Triton kernel that fits Llama, and its tiles
            assert "triton" in space.knobs["cross_entropy_kernel"].choices, path
            assert {"ce_block_size", "ce_num_warps"} <= set(space.knobs), path
        assert space.baseline, f"{path} declares no baseline"
        assert {"tokens_per_second", "val_loss"} <= set(space.objectives)


def test_default_space_follows_the_gpu_count():
    assert default_space_path(0).stem == "cpu-tiny-gpt"
    assert default_space_path(1).stem == "gpu-1-llama-1b"
    assert default_space_path(8).stem == "gpu-8-llama-8b"


def test_typed_values(tmp_path):
    space = load_space(write(tmp_path, BASE + """\
knobs:
  learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}
  micro_batch_size: {choices: [2, 4]}
  compile: {choices: [false]}
objectives: [throughput, loss, memory]
constraints:
  - {expr: "micro_batch_size * seq_len <= 64", why: memory}
"""))
    assert space.knobs["learning_rate"].log and not space.knobs["learning_rate"].fixed
    assert space.knobs["compile"].fixed and not space.knobs["micro_batch_size"].fixed
    assert space.objectives == ["tokens_per_second", "val_loss", "peak_memory"]
    assert space.workload.vocab_size == "auto"


@pytest.mark.parametrize(
    "text, expected",
    [
        (BASE + "knobs: {learning_rate: {low: 1, high: [}\n", "not valid YAML at line"),
        (BASE + "knobs:\n  lr: {low: 1.0e-4, high: 1.0e-2}\n", "unknown knob 'lr'"),
        (BASE + "knobs:\n  dp: {choices: [1, 2]}\n", "dp is derived"),
        (BASE + "knobs:\n  micro_batch_size: {choices: []}\n", "knobs.micro_batch_size: choices is empty"),
        (BASE + "knobs:\n  learning_rate: {low: 1.0e-2, high: 1.0e-4}\n", "knobs.learning_rate: low must be <= high"),
        (BASE + "knobs:\n  learning_rate: {low: 0, high: 1.0e-2, log: true}\n", "log domain needs low > 0"),
        (BASE + "knobs:\n  precision: {choices: [fp32, fp8]}\n", "'fp8' is not one of fp32, bf16, fp16"),
        (BASE + "knobs:\n  micro_batch_size: {choices: [2.5]}\n", "takes int values"),
        (BASE + "knobs:\n  warmup_fraction: {low: 0.0, high: 1.5}\n", "out of range"),
        (BASE + "knobs:\n  compile: {low: 0, high: 1}\n", "takes choices"),
        (BASE + "knobs:\n  compile: {choices: [false]}\n  learning_rate: {choices: [1.0e-3], low: 1}\n", "not both"),
        (BASE + "knobs: {}\ncolour: blue\n", "colour: unknown field"),
        ("name: t\nknobs: {}\n", "workload: required field is missing"),
        ("name: t\nworkload: {n_layer: 1, n_embd: 10, n_head: 3, seq_len: 8}\nknobs: {}\n", "n_embd % n_head == 0"),
        (BASE + "knobs: {}\nobjectives: [speed]\n", "unknown objective 'speed'"),
        (BASE + "knobs: {}\nconstraints: [{expr: \"__import__('os').system('true')\"}]\n", "only arithmetic"),
        (BASE + "knobs: {}\nconstraints: [{expr: \"colour > 1\"}]\n", "unknown name(s) ['colour']"),
        (BASE + "knobs: {}\nbaseline: {lr: 1}\n", "baseline: unknown knob 'lr'"),
        ("- just\n- a list\n", "must be a YAML mapping"),
        (BASE + "knobs:\n  mlp_block_m: {choices: [64, 48]}\n", "knob 'mlp_block_m': 48 is not a power of two"),
        (BASE + "knobs:\n  kernels: {choices: [torch, cuda]}\n", "'cuda' is not one of torch, triton"),
        (BASE + "knobs:\n  mlp_num_warps: {choices: [64]}\n", "out of range"),
        ("name: t\nworkload: {model: llama, seq_len: 8}\nknobs: {}\n",
         "workload.model: 'llama' is not a model; valid: gpt, hf:<model_type>"),
        ("name: t\nworkload: {model: gpt, seq_len: 8, n_layer: 1}\nknobs: {}\n", "model gpt needs n_embd, n_head"),
        ("name: t\nworkload: {n_layer: 1, n_embd: 8, n_head: 2, seq_len: 8, config: {hidden_size: 8}}\nknobs: {}\n",
         "model gpt takes its shape from n_layer, n_embd and n_head, not from config"),
        ("name: t\nworkload: {model: 'hf:llama', n_layer: 2, seq_len: 8}\nknobs: {}\n",
         "n_layer: a Hugging Face model takes its shape from its own config fields; give config: {num_hidden_layers"),
        (BASE.replace("seq_len: 8}", "seq_len: 8, tokenizer: 'bpe:100'}") + "knobs: {}\n",
         "workload.tokenizer: 'bpe:100': bpe:<vocab size> needs a whole vocabulary size of at least 259"),
    ],
)
def test_bad_spaces_name_file_and_field(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_space(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message, message
    assert "\n" not in message


def test_missing_space_file(tmp_path):
    with pytest.raises(UserError, match="no such search-space file"):
        load_space(tmp_path / "nope.yaml")


def test_every_knob_has_a_config_section():
    from cotune.config import TrialConfig

    flat = TrialConfig().flat()
    for name in KNOBS:
        # `kernels` sets the three per-kernel choices (mlp_kernel, ...) at once
        assert name in flat or name == "kernels", name
