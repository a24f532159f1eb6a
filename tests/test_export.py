"""Exporters: every format is read back by its target library's own parser, values match the config,
``--pick`` chooses the right trial, and ``cotune export --format json`` round-trips through ``cotune trial``.

Libraries (CI installs them, see README): transformers, lightning, accelerate, deepspeed, torchtitan (>= 0.3,
needs triton) and torchtitan 0.2.2 in ``.ci/torchtitan-0.2`` for the legacy TOML. Megatron-LM's parser is not
installable (``megatron/training/arguments.py`` ships only in the Megatron-LM repository, not in the
``megatron-core`` wheel, and imports CUDA-only modules), so its flags are checked against a copy of them below;
transformers' run_clm.py / run_mlm.py are not in its wheel either, so their argument dataclasses are copied too.
The model each format names is rebuilt with the target's own code where it has one (transformers' configs,
torchtitan's model registry) and compared with the model the trial trained.
This machine has no GPU: a config for ``cuda`` is loaded as noted in each loader.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import optuna
import pytest

from cotune.config import (
    BatchConfig,
    KernelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    SoftwareConfig,
    TrialConfig,
    WorkloadConfig,
)
from cotune.errors import UserError
from cotune.export import EXPORTERS, Exported, export
from cotune.export.architecture import HF_DEFAULTS, gpt2_twin, setting
from cotune.export.base import budget_steps, warmup_steps
from cotune.export.pick import config_from_study, pick_trial
from cotune.report import report_info
from tests.conftest import ROOT, run_cli

# --- configs covering every mapping: one process on CPU, and 8-GPU layouts ------------------------------------

GPT2_MEDIUM = WorkloadConfig(n_layer=24, n_embd=1024, n_head=16, seq_len=1024, vocab_size=50304)
GPU_RUN = RunConfig(device="cuda", token_budget=8_388_608, seed=1)
CONFIGS: dict[str, TrialConfig] = {
    # As the real cpu-tiny-gpt study's trials: fp32, checkpointing, accumulation.
    "cpu": TrialConfig(
        batch=BatchConfig(micro_batch_size=16, global_batch_size=32, grad_accum_steps=2),
        optimizer=OptimizerConfig(learning_rate=1.29e-3, warmup_fraction=0.143, weight_decay=6.8e-3, adam_beta2=0.923),
        software=SoftwareConfig(activation_checkpointing=True), run=RunConfig(token_budget=98304, seed=3),
    ),
    "ddp": TrialConfig(workload=GPT2_MEDIUM, run=GPU_RUN, parallel=ParallelConfig(dp=4),
                       batch=BatchConfig(micro_batch_size=8, global_batch_size=64, grad_accum_steps=2),
                       precision=PrecisionConfig("bf16")),
    "hsdp": TrialConfig(workload=GPT2_MEDIUM, run=GPU_RUN, parallel=ParallelConfig(dp=2, fsdp=4),
                        batch=BatchConfig(micro_batch_size=4, global_batch_size=64, grad_accum_steps=2),
                        precision=PrecisionConfig("bf16"),
                        software=SoftwareConfig(activation_checkpointing=True, compile=True)),
    "3d": TrialConfig(workload=GPT2_MEDIUM, run=GPU_RUN,
                      parallel=ParallelConfig(fsdp=2, tp=2, pp=2, sequence_parallel=True, pp_schedule="interleaved1f1b",
                                              pp_microbatches=4, pp_virtual_stages=2),
                      batch=BatchConfig(micro_batch_size=8, global_batch_size=128, grad_accum_steps=8),
                      precision=PrecisionConfig("fp16")),
}

# Hugging Face workloads, each config dict as cotune.trial.hf.resolve_config makes it: the space's fields, then
# the tokenizer's vocabulary, positions >= seq_len where the default is fewer, every dropout above 0 set to 0.0, and
# bos/eos = end-of-text, pad = the tokenizer's pad (cotune's BPE: end-of-text 0, mask 1, pad 2).
# test_config_dicts_are_what_cotune_resolves checks them against resolve_config itself.
LLAMA_1B_SPACE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                  "intermediate_size": 8192, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                  "tie_word_embeddings": True}
# Llama 3.1 8B as its own config.json has it (transformers 5 spelling), with a local copy of its tokenizer.
LLAMA31_8B_SPACE = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                    "intermediate_size": 14336, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
                    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192}}
GPT2_SPACE = {"n_layer": 12, "n_embd": 768, "n_head": 12}
BERT_SPACE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
HF_SPACES = {  # config name: (model, the space's config fields, seq_len, vocabulary, end-of-text id, pad id)
    "llama": ("hf:llama", LLAMA_1B_SPACE, 4096, 32768, 0, 2),
    "llama8b": ("hf:llama", LLAMA31_8B_SPACE, 8192, 128256, 128001, None),
    "gpt2": ("hf:gpt2", GPT2_SPACE, 2048, 50257, 50256, None),
    "bert": ("hf:bert", BERT_SPACE, 512, 8192, 0, 2),
}
HF_FIELDS = {
    "llama": {**LLAMA_1B_SPACE, "vocab_size": 32768, "max_position_embeddings": 4096, "bos_token_id": 0,
              "eos_token_id": 0, "pad_token_id": 2},
    "llama8b": {**LLAMA31_8B_SPACE, "vocab_size": 128256, "bos_token_id": 128001, "eos_token_id": 128001,
                "pad_token_id": None},
    "gpt2": {**GPT2_SPACE, "vocab_size": 50257, "n_positions": 2048, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attn_pdrop": 0.0, "summary_first_dropout": 0.0, "bos_token_id": 50256, "eos_token_id": 50256,
             "pad_token_id": None},
    "bert": {**BERT_SPACE, "vocab_size": 8192, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
             "pad_token_id": 2},
}
CONFIGS.update({
    # Llama-3.2-1B-style on 8 GPUs: FSDP x TP x PP, with the BPE cotune trains and its built-in corpus.
    "llama": TrialConfig(
        workload=WorkloadConfig(model="hf:llama", config=HF_FIELDS["llama"], n_layer=16, n_embd=2048, n_head=32,
                                n_kv_head=8, seq_len=4096, vocab_size=32768, tokenizer="bpe:32768"),  # MLP: 4 x 2048
        run=GPU_RUN, parallel=ParallelConfig(fsdp=2, tp=2, pp=2, pp_schedule="1f1b", pp_microbatches=4),
        batch=BatchConfig(micro_batch_size=8, global_batch_size=128, grad_accum_steps=8),
        precision=PrecisionConfig("bf16"), software=SoftwareConfig(activation_checkpointing=True)),
    # Llama-3.1-8B on 8 GPUs (FSDP 4 x TP 2), its own tokenizer folder and a text file.
    "llama8b": TrialConfig(
        workload=WorkloadConfig(model="hf:llama", config=HF_FIELDS["llama8b"], n_layer=32, n_embd=4096, n_head=32,
                                n_kv_head=8, ffn_hidden=14336, seq_len=8192, vocab_size=128256,
                                tokenizer="/models/llama-3.1-8b", data="/data/fineweb-edu.txt"),
        run=GPU_RUN, parallel=ParallelConfig(fsdp=4, tp=2),
        batch=BatchConfig(micro_batch_size=1, global_batch_size=32, grad_accum_steps=8),
        precision=PrecisionConfig("bf16"), software=SoftwareConfig(compile=True)),
    # GPT-2 small from transformers on four GPUs (DDP) with GPT-2's own tokenizer.
    "gpt2": TrialConfig(
        workload=WorkloadConfig(model="hf:gpt2", config=HF_FIELDS["gpt2"], n_layer=12, n_embd=768, n_head=12,
                                seq_len=2048, vocab_size=50257, tokenizer="/models/gpt2"),
        run=GPU_RUN, parallel=ParallelConfig(dp=4),
        batch=BatchConfig(micro_batch_size=8, global_batch_size=64, grad_accum_steps=2),
        precision=PrecisionConfig("fp16")),
    # BERT-base masked LM on two CPU processes (FSDP) over JSON Lines.
    "bert": TrialConfig(
        workload=WorkloadConfig(model="hf:bert", config=HF_FIELDS["bert"], objective="masked_lm", n_layer=12,
                                n_embd=768, n_head=12, seq_len=512, vocab_size=8192,
                                tokenizer="bpe:8192", data="corpus.jsonl"),
        parallel=ParallelConfig(fsdp=2), batch=BatchConfig(micro_batch_size=4, global_batch_size=16, grad_accum_steps=2),
        run=RunConfig(token_budget=1_048_576)),
})


def _cuda(config: TrialConfig) -> bool:
    return config.run.device == "cuda"


# --- loaders: each reads an exported file with the target library and returns what it built ------------------


def load_json(path: Path, config: TrialConfig) -> TrialConfig:
    """cotune's own loader: the file is the config, exactly."""
    return TrialConfig.load(path)


# run_clm.py's and run_mlm.py's own argument dataclasses (transformers' examples/pytorch/language-modeling, which
# the transformers wheel does not ship): run_clm.py at commit 00d481d18f914b55e65faa31e82321629691eadb, run_mlm.py's
# data arguments at 0055f834470c4662897181543b27d8cf8c50b9d6 (its model arguments are run_clm's), with the
# __post_init__ rules our files meet. The scripts also demand a dataset_name or train_file; a file without one
# lists workload.data instead (test_hf_names_the_model_and_data).
@dataclass
class ScriptModelArguments:
    model_name_or_path: str | None = None
    model_type: str | None = None
    config_overrides: str | None = None
    config_name: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    use_fast_tokenizer: bool = True
    model_revision: str = "main"
    token: str | None = None
    trust_remote_code: bool = False
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.config_overrides is not None and (self.config_name is not None or self.model_name_or_path is not None):
            raise ValueError("--config_overrides can't be used in combination with --config_name or "
                             "--model_name_or_path")


def _check_files(args: Any) -> None:
    for name in ("train_file", "validation_file"):
        value = getattr(args, name)
        if value is not None and value.split(".")[-1] not in ("csv", "json", "txt"):
            raise ValueError(f"`{name}` should be a csv, a json or a txt file.")


@dataclass
class ClmDataArguments:
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    streaming: bool = False
    block_size: int | None = None
    overwrite_cache: bool = False
    validation_split_percentage: int | None = 5
    preprocessing_num_workers: int | None = None
    keep_linebreaks: bool = True

    def __post_init__(self) -> None:
        _check_files(self)


@dataclass
class MlmDataArguments:
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    overwrite_cache: bool = False
    validation_split_percentage: int | None = 5
    max_seq_length: int | None = None
    preprocessing_num_workers: int | None = None
    mlm_probability: float = 0.15
    line_by_line: bool = False
    pad_to_max_length: bool = False
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        _check_files(self)


def load_hf(path: Path, config: TrialConfig) -> Any:
    """What ``python run_clm.py this.json`` (run_mlm.py for masked LM) parses: HfArgumentParser over the script's
    ModelArguments, DataTrainingArguments and TrainingArguments, unknown keys an error; a deprecated field's
    FutureWarning fails too. Returns (model_args, data_args, training_args).

    No GPU here: TrainingArguments refuses bf16 without one, so a cuda config is parsed with use_cpu=true.
    """
    from transformers import HfArgumentParser, TrainingArguments

    data_class = MlmDataArguments if config.workload.objective == "masked_lm" else ClmDataArguments
    parser = HfArgumentParser((ScriptModelArguments, data_class, TrainingArguments))
    data = json.loads(path.read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if _cuda(config):
            parsed = parser.parse_dict({**data, "use_cpu": True})
        else:
            parsed = parser.parse_json_file(str(path))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)
                  and any(f"`{key}`" in str(w.message) for key in data)]
    assert not deprecated, deprecated
    # TrainingArguments alone reads the file too (the script's keys aside), as the module docstring says.
    (alone,) = HfArgumentParser(TrainingArguments).parse_dict({**data, "use_cpu": True}, allow_extra_keys=True)
    assert alone.max_steps == parsed[2].max_steps
    return parsed


def load_lightning(path: Path, config: TrialConfig) -> Any:
    """LightningCLI parses the YAML (strategy class and its init_args included) and builds the Trainer and AdamW.

    No GPU here, and FSDP refuses a CPU accelerator: a cuda config builds its Trainer with the GPU count faked
    (the exact file; nothing touches a device while constructing).
    """
    import torch
    from lightning.fabric.accelerators import cuda as fabric_cuda
    from lightning.pytorch import LightningModule
    from lightning.pytorch.cli import LightningCLI

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys, "argv", ["train.py"]))
        if _cuda(config):
            gpus = config.parallel.world_size
            stack.enter_context(mock.patch.object(fabric_cuda, "num_cuda_devices", return_value=gpus))
            stack.enter_context(mock.patch("torch.cuda.is_available", return_value=True))
            stack.enter_context(mock.patch("torch.cuda.device_count", return_value=gpus))
        return LightningCLI(Tiny, run=False, args=["--config", str(path)], save_config_callback=None)


class _DataParallelMPU:
    """The one method DeepSpeedConfig asks an mpu: the data-parallel world size (dp * fsdp ranks)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def get_data_parallel_world_size(self) -> int:
        return self.size


def load_deepspeed(path: Path, config: TrialConfig) -> Any:
    """DeepSpeedConfig(dict, mpu): it checks train_batch = micro * accumulation * data-parallel ranks.

    Without an initialised process group DeepSpeedConfig assumes one rank, so get_rank is stubbed and an mpu gives
    the data-parallel size. DeepSpeed ignores unknown top-level keys, so every key is checked to be one it reads; the
    optimizer and scheduler blocks are built for real (torch AdamW, DeepSpeed's WarmupCosineLR).
    """
    import deepspeed.comm
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    read: set[str] = set()

    class Recording(dict):
        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

    data = Recording(json.loads(path.read_text()))
    with mock.patch.object(deepspeed.comm, "get_rank", return_value=0):
        ds = DeepSpeedConfig(data, mpu=_DataParallelMPU(config.parallel.data_parallel))
    assert set(data) <= read, f"keys DeepSpeed never reads: {sorted(set(data) - read)}"
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], **data["optimizer"]["params"])
    assert ds.scheduler_name == "WarmupCosineLR"
    WarmupCosineLR(optimizer, **ds.scheduler_params)
    return ds


def _args_of(path: Path) -> list[str]:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [token for line in lines for token in shlex.split(line)]


def load_torchtitan(path: Path, config: TrialConfig) -> Any:
    """torchtitan's ConfigManager.parse_args (it rejects unknown keys); the schedule name is resolved by torch."""
    from torch.distributed.pipelining.schedules import get_schedule_class
    from torchtitan.config import ConfigManager

    parsed = ConfigManager().parse_args(_args_of(path))
    if config.parallel.pp > 1:
        get_schedule_class(parsed.parallelism.pipeline_parallel_schedule)
    return parsed


LEGACY_TORCHTITAN = Path(os.environ.get("COTUNE_TORCHTITAN_LEGACY", ROOT / ".ci" / "torchtitan-0.2"))
_LEGACY_READ = """
import json, sys, importlib.metadata
from torchtitan.config import ConfigManager
c = ConfigManager().parse_args(["--job.config_file", sys.argv[1]])
print(json.dumps({"version": importlib.metadata.version("torchtitan"),
                  **{s: vars(getattr(c, s)) for s in ("training", "parallelism", "optimizer", "lr_scheduler",
                                                       "compile", "debug", "model")},
                  "ac_mode": c.activation_checkpoint.mode}, default=str))
"""


def load_torchtitan_toml(path: Path, config: TrialConfig) -> dict:
    """torchtitan 0.2.2's ConfigManager, in a child process (0.3 is installed here): unknown fields are errors."""
    if not (LEGACY_TORCHTITAN / "torchtitan").is_dir():
        pytest.fail(f"torchtitan 0.2.2 is not in {LEGACY_TORCHTITAN}; install it with "
                    f"`pip install --no-deps --target {LEGACY_TORCHTITAN} torchtitan==0.2.2`")
    env = {**os.environ, "PYTHONPATH": str(LEGACY_TORCHTITAN)}
    done = subprocess.run([sys.executable, "-c", _LEGACY_READ, str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed["version"] == "0.2.2"
    return parsed


def load_accelerate(path: Path, config: TrialConfig) -> Any:
    """accelerate's load_config_from_file (unknown top-level keys are errors), then `accelerate launch`'s own
    validation, which copies each nested key onto its argument parser: each must be one of its flags."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(path))
    parser = launch_command_parser()
    flags = {action.dest for action in parser._actions}
    for section in ("fsdp_config", "parallelism_config", "dynamo_config"):
        unknown = [key for key in getattr(loaded, section) if key not in flags]
        assert not unknown, f"{section} keys accelerate launch does not take: {unknown}"
    args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "train.py"]))
    return loaded, args


# Megatron-LM's flags as its parser defines them: megatron/training/arguments.py in NVIDIA/Megatron-LM at commit
# 000c4ac24f61159c138b0975def722c65245983c (add_argument calls in _add_network_size_args, _add_regularization_args,
# _add_training_args, _add_initialization_args, _add_learning_rate_args, _add_checkpointing_args,
# _add_mixed_precision_args, _add_distributed_args, _add_data_args, _add_tokenizer_args). True = store_true;
# a str = store_false into that dest; a tuple = its choices.
MEGATRON_FLAGS: dict[str, type | bool | str | tuple[str, ...]] = {
    # the model (network size, training, initialization, data and tokenizer groups)
    "--ffn-hidden-size": int, "--kv-channels": int, "--group-query-attention": True, "--num-query-groups": int,
    "--position-embedding-type": ("learned_absolute", "rope", "mrope", "relative", "none"),
    "--rotary-base": int, "--use-rope-scaling": True, "--rope-scaling-factor": float,
    "--normalization": ("LayerNorm", "RMSNorm"), "--norm-epsilon": float, "--swiglu": True,
    "--untie-embeddings-and-output-weights": True, "--disable-bias-linear": "add_bias_linear",
    "--add-qkv-bias": True, "--bert-no-binary-head": "bert_binary_head", "--mask-prob": float,
    "--init-method-std": float, "--tokenizer-model": str,
    "--tokenizer-type": ("BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
                         "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
                         "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer"),
    # the run
    "--num-layers": int, "--hidden-size": int, "--num-attention-heads": int, "--max-position-embeddings": int,
    "--seq-length": int, "--attention-dropout": float, "--hidden-dropout": float,
    "--weight-decay": float, "--clip-grad": float, "--adam-beta1": float, "--adam-beta2": float,
    "--adam-eps": float, "--micro-batch-size": int, "--global-batch-size": int,
    "--recompute-granularity": ("full", "selective"), "--recompute-method": ("uniform", "block"),
    "--recompute-num-layers": int, "--train-iters": int, "--optimizer": ("adam", "sgd", "muon", "dist_muon"),
    "--sequence-parallel": True, "--seed": int, "--lr": float, "--min-lr": float,
    "--lr-decay-style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "--lr-warmup-fraction": float, "--lr-warmup-iters": int, "--lr-decay-iters": int,
    "--ckpt-format": ("torch", "torch_dist", "zarr", "torch_dcp", "fsdp_dtensor"),
    "--fp16": True, "--bf16": True, "--loss-scale": float, "--initial-loss-scale": float,
    "--min-loss-scale": float, "--loss-scale-window": float, "--hysteresis": int,
    "--tensor-model-parallel-size": int, "--pipeline-model-parallel-size": int,
    "--num-virtual-stages-per-pipeline-rank": int, "--use-distributed-optimizer": True,
    "--use-megatron-fsdp": True, "--use-torch-fsdp2": True,
    "--data-parallel-sharding-strategy": ("no_shard", "optim", "optim_grads", "optim_grads_params"),
    "--num-distributed-optimizer-instances": int,
}


def load_megatron(path: Path, config: TrialConfig) -> argparse.Namespace:
    """The flags above in an argparse parser built as Megatron builds its own, plus the validate_args rules
    (same file) and TransformerConfig.__post_init__ rules (megatron/core/transformer/transformer_config.py) that
    these flags meet."""
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for flag, kind in MEGATRON_FLAGS.items():
        if kind is True:
            parser.add_argument(flag, action="store_true")
        elif isinstance(kind, str):
            parser.add_argument(flag, action="store_false", dest=kind)
        elif isinstance(kind, tuple):
            parser.add_argument(flag, choices=kind)
        else:
            parser.add_argument(flag, type=kind)
    args, unknown = parser.parse_known_args(_args_of(path))
    assert not unknown, f"flags Megatron-LM's parser does not define: {unknown}"
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    data_parallel = config.parallel.world_size // model_parallel
    assert config.parallel.world_size % model_parallel == 0
    assert args.global_batch_size % (args.micro_batch_size * data_parallel) == 0
    assert args.min_lr <= args.lr and args.max_position_embeddings >= args.seq_length
    assert not (args.fp16 and args.bf16)
    if args.use_megatron_fsdp:
        assert args.ckpt_format == "fsdp_dtensor"
    if args.num_virtual_stages_per_pipeline_rank:
        assert args.pipeline_model_parallel_size > 1
    if args.recompute_method:
        assert args.recompute_granularity == "full"
    tp = args.tensor_model_parallel_size
    groups = args.num_query_groups if args.group_query_attention else args.num_attention_heads
    assert args.num_attention_heads % tp == 0 and groups % tp == 0 and args.num_attention_heads % groups == 0
    if args.kv_channels is None:
        assert args.hidden_size % args.num_attention_heads == 0
    return args


LOADERS: dict[str, Callable[[Path, TrialConfig], Any]] = {
    "json": load_json, "hf": load_hf, "lightning": load_lightning, "deepspeed": load_deepspeed,
    "torchtitan": load_torchtitan, "torchtitan-toml": load_torchtitan_toml, "accelerate": load_accelerate,
    "megatron": load_megatron,
}


def _write(config: TrialConfig, fmt: str, tmp_path: Path) -> tuple[Exported, Path]:
    out = export(config, fmt)
    path = tmp_path / f"{fmt}{out.suffix}"
    path.write_text(out.text)
    return out, path


def _load(config_name: str, fmt: str, tmp_path: Path) -> Any:
    config = CONFIGS[config_name]
    _, path = _write(config, fmt, tmp_path)
    return LOADERS[fmt](path, config)


# --- the contract: every exporter, every config ---------------------------------------------------------------


def test_every_registered_format_has_a_library_loader():
    assert set(EXPORTERS) == set(LOADERS)


@pytest.mark.parametrize("config_name", CONFIGS)
# torchtitan 0.2's TOML is read in a child interpreter that imports torch and torchtitan 0.2 (seconds each): slow.
@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f == "torchtitan-toml" else f
                                 for f in sorted(LOADERS)])
def test_exported_file_is_parsed_by_its_library_and_lists_what_it_cannot_express(fmt, config_name, tmp_path):
    out, path = _write(CONFIGS[config_name], fmt, tmp_path)
    assert out.text.strip() and out.suffix in (".json", ".yaml", ".toml", ".args")
    assert isinstance(out.unexpressed, list) and all(isinstance(item, str) and item for item in out.unexpressed)
    if out.suffix != ".json":  # formats with comments carry the list in the file itself
        for item in out.unexpressed:
            assert f"#   - {item}" in out.text
    LOADERS[fmt](path, CONFIGS[config_name])


# Knobs each format cannot express for a config, which its list must name.
EXPECTED_LOST = {
    "hf": ("3d", ["parallel.tp=2", "parallel.pp=2"]),
    "lightning": ("3d", ["batch.micro_batch_size=8", "parallel.pp=2", "precision.precision=fp16"]),
    "deepspeed": ("hsdp", ["parallel.dp=2", "software.compile=true", "software.activation_checkpointing=true"]),
    "torchtitan": ("3d", ["precision.precision=fp16", "workload.model=gpt"]),
    "torchtitan-toml": ("3d", ["precision.precision=fp16"]),
    "accelerate": ("3d", ["parallel.pp=2", "optimizer.learning_rate=0.001", "batch.grad_accum_steps=8"]),
    "megatron": ("hsdp", ["software.compile=true", "parallel.dp=2"]),
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED_LOST))
def test_knobs_a_target_cannot_express_are_listed(fmt):
    config_name, expected = EXPECTED_LOST[fmt]
    listed = export(CONFIGS[config_name], fmt).unexpressed
    for prefix in expected:
        assert any(item.startswith(prefix + ":") or item.startswith(prefix + " ") for item in listed), (prefix, listed)


@pytest.mark.parametrize("fmt", sorted(EXPECTED_LOST))
def test_triton_kernels_are_listed_with_their_tiles(fmt):
    config = replace(CONFIGS["ddp"], kernels=KernelConfig(mlp="triton", layernorm="triton", mlp_block_m=128))
    listed = export(config, fmt).unexpressed
    lines = [item for item in listed if item.startswith("kernels.")]
    assert [line.split(":")[0] for line in lines] == ["kernels.mlp=triton", "kernels.layernorm=triton"], listed
    assert "BLOCK_M=128" in lines[0]
    assert not any(item.startswith("kernels.") for item in export(CONFIGS["ddp"], fmt).unexpressed)


def test_json_expresses_everything():
    for config in CONFIGS.values():
        assert export(config, "json").unexpressed == []


def test_exporters_import_neither_torch_nor_the_target_libraries():
    code = ("import sys; from cotune.config import TrialConfig, WorkloadConfig\n"
            "from cotune.export import EXPORTERS, export\n"
            "llama = TrialConfig(workload=WorkloadConfig(model='hf:llama', config={'hidden_size': 64}))\n"
            "[export(c, f) for f in EXPORTERS for c in (TrialConfig(), llama)]\n"
            "heavy = ('torch', 'transformers', 'lightning', 'deepspeed', 'torchtitan', 'accelerate', 'megatron')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


# --- values, read back through each library --------------------------------------------------------------------


@pytest.mark.parametrize("config_name", CONFIGS)
def test_json_is_the_config_itself(config_name, tmp_path):
    assert _load(config_name, "json", tmp_path) == CONFIGS[config_name]


@pytest.mark.parametrize("config_name", ["cpu", "hsdp", "3d"])
def test_hf_values(config_name, tmp_path):
    config, (_, _, args) = CONFIGS[config_name], _load(config_name, "hf", tmp_path)
    assert args.per_device_train_batch_size == config.batch.micro_batch_size
    assert args.gradient_accumulation_steps == config.batch.grad_accum_steps
    assert args.max_steps == budget_steps(config)
    assert args.get_warmup_steps(args.max_steps) in (warmup_steps(config), warmup_steps(config) + 1)  # ceil vs round
    assert (args.bf16, args.fp16) == (config.precision.precision == "bf16", config.precision.precision == "fp16")
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (args.learning_rate, args.weight_decay, args.adam_beta2, args.max_grad_norm) == (
        config.optimizer.learning_rate, config.optimizer.weight_decay, config.optimizer.adam_beta2,
        config.optimizer.grad_clip)
    assert args.torch_compile == config.software.compile
    if config.parallel.fsdp > 1:  # FSDP2, with FSDP's own activation checkpointing
        assert args.fsdp and args.fsdp_config["version"] == 2
        assert args.fsdp_config["activation_checkpointing"] == config.software.activation_checkpointing
    else:
        assert not args.fsdp and args.activation_checkpointing == config.software.activation_checkpointing


# --- the model, named in each format ---------------------------------------------------------------------------

MODEL_CONFIGS = ["cpu", "llama", "llama8b", "gpt2", "bert"]  # the built-in GPT and each Hugging Face workload
# workload.config fields the hf file cannot carry in config_overrides, per config (the rest it must carry exactly).
HF_CONFIG_LOST = {"cpu": set(), "llama": {"rope_parameters", "pad_token_id"}, "llama8b": {"rope_parameters"},
                  "gpt2": set(), "bert": set()}


def _expected_hf_config(w: WorkloadConfig) -> Any:
    """The transformers config of the model the trial trained (the built-in GPT's is GPT-2's)."""
    from transformers import AutoConfig

    if w.model == "gpt":
        return AutoConfig.for_model("gpt2", **gpt2_twin(w))
    return AutoConfig.for_model(w.model.removeprefix("hf:"), **w.config)


@pytest.mark.parametrize("config_name", sorted(HF_SPACES))
def test_config_dicts_are_what_cotune_resolves(config_name):
    """The HF configs above are the dicts cotune's own resolve_config passes, and their shape fields are the model's."""
    from cotune.trial.hf import resolve_config

    model, fields, seq_len, vocab, eot, pad = HF_SPACES[config_name]
    w = CONFIGS[config_name].workload
    resolved, objective = resolve_config(model, fields, seq_len=seq_len, vocab_size=vocab, eot_id=eot, pad_id=pad)
    assert resolved == w.config and objective == w.objective
    hf = _expected_hf_config(w)
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.vocab_size) == (
        w.n_layer, w.n_embd, w.n_head, w.vocab_size)
    assert getattr(hf, "num_key_value_heads", hf.num_attention_heads) == w.kv_heads
    assert (getattr(hf, "intermediate_size", None) or getattr(hf, "n_inner", None) or 4 * hf.hidden_size) == w.ffn_width


@pytest.mark.parametrize("config_name", MODEL_CONFIGS)
def test_hf_names_the_model_and_data(config_name, tmp_path):
    """run_clm.py's from-scratch path, CONFIG_MAPPING[model_type]() then update_from_string(config_overrides), rebuilds
    the trained architecture: every config field equal, except the ones the file lists as not carried."""
    from transformers import AutoConfig

    from cotune.export.hf import ROPE_FIELDS

    config = CONFIGS[config_name]
    w = config.workload
    out, path = _write(config, "hf", tmp_path)
    model_args, data_args, _ = LOADERS["hf"](path, config)
    model_type = "gpt2" if w.model == "gpt" else w.model.removeprefix("hf:")
    assert model_args.model_type == model_type and model_args.model_name_or_path is None
    rebuilt = AutoConfig.for_model(model_type)
    rebuilt.update_from_string(model_args.config_overrides)
    expected, got = _expected_hf_config(w).to_dict(), rebuilt.to_dict()
    differ = {key for key in expected.keys() | got.keys() if expected.get(key) != got.get(key)}
    listed = {item.split("=")[0].removeprefix("workload.config.") for item in out.unexpressed
              if item.startswith("workload.config.")}
    assert listed == HF_CONFIG_LOST[config_name]
    assert differ <= listed | ({"rope_parameters"} if listed & set(ROPE_FIELDS) else set()), (differ, listed)
    if config_name == "llama":  # LlamaConfig derives head_dim in __init__: the file must carry it
        assert rebuilt.head_dim == 64 and AutoConfig.for_model("llama").head_dim == 128
    if w.objective == "masked_lm":
        assert (data_args.max_seq_length, data_args.mlm_probability) == (w.seq_len, 0.15)
    else:
        assert data_args.block_size == w.seq_len
    local_tokenizer = w.tokenizer != "bytes" and not w.tokenizer.startswith("bpe:")
    assert model_args.tokenizer_name == (w.tokenizer if local_tokenizer else None)
    assert any(item.startswith("workload.tokenizer=") for item in out.unexpressed) == (not local_tokenizer)
    text_file = w.data.endswith((".txt", ".json", ".csv"))
    assert data_args.train_file == (w.data if text_file else None)
    assert any(item.startswith("workload.data=") for item in out.unexpressed) == (not text_file)


def test_hf_local_model_folders(tmp_path):
    """A local config folder is config_name (fresh weights, as the trial builds it); one with weights, whose weights
    the trial loaded, is model_name_or_path; config_overrides goes with neither, so cotune's fields are listed."""
    folder = tmp_path / "tiny-llama"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    config = replace(CONFIGS["llama"], workload=replace(CONFIGS["llama"].workload, model=f"hf:{folder}"))
    for weights in (False, True):
        if weights:
            (folder / "model.safetensors").write_bytes(b"")
        out, path = _write(config, "hf", tmp_path)
        model_args, _, _ = LOADERS["hf"](path, config)
        assert (model_args.config_name, model_args.model_name_or_path) == (
            (None, str(folder)) if weights else (str(folder), None))
        assert model_args.config_overrides is None and model_args.model_type is None
        assert any(item.startswith("workload.config={") for item in out.unexpressed)


def test_builtin_gpt_is_gpt2s_network():
    """The GPT-2 config the exports name for the built-in GPT computes the same logits with the same weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from cotune.trial.model import GPT, GPTConfig

    w = CONFIGS["cpu"].workload
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=w.vocab_size, seq_len=w.seq_len, n_layer=w.n_layer, n_head=w.n_head,
                         n_embd=w.n_embd)).eval()
    theirs = GPT2LMHeadModel(GPT2Config(**gpt2_twin(w))).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    t = theirs.transformer
    with torch.no_grad():  # GPT-2's Conv1D holds (in, out): our Linear weights transposed, q/k/v side by side
        t.wte.weight.copy_(ours.wte.weight)
        t.wpe.weight.copy_(ours.wpe.weight)
        t.ln_f.load_state_dict(ours.ln_f.state_dict())
        for mine, block in zip(ours.blocks, t.h):
            block.ln_1.load_state_dict(mine.ln_1.state_dict())
            block.ln_2.load_state_dict(mine.ln_2.state_dict())
            a = mine.attn
            block.attn.c_attn.weight.copy_(torch.cat([a.q.weight, a.k.weight, a.v.weight]).T)
            block.attn.c_attn.bias.copy_(torch.cat([a.q.bias, a.k.bias, a.v.bias]))
            for conv, linear in ((block.attn.c_proj, a.proj), (block.mlp.c_fc, mine.mlp.fc),
                                 (block.mlp.c_proj, mine.mlp.proj)):
                conv.weight.copy_(linear.weight.T)
                conv.bias.copy_(linear.bias)
        x = torch.randint(0, w.vocab_size, (2, w.seq_len))
        assert torch.allclose(ours(x), theirs(input_ids=x).logits, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(HF_DEFAULTS))
def test_defaults_the_exporters_assume_are_transformers(model_type):
    """architecture.HF_DEFAULTS and hf.NONE_BY_DEFAULT are the installed transformers' config class defaults."""
    from transformers import AutoConfig, PretrainedConfig

    from cotune.export.hf import CHECKED_TYPES, NONE_BY_DEFAULT

    default = AutoConfig.for_model(model_type)
    for key, value in HF_DEFAULTS[model_type].items():
        actual = default.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(default, key)
        assert actual == value, (key, actual, value)
    base = {key for key, value in PretrainedConfig().to_dict().items() if value is None}
    nones = {key for key, value in default.to_dict().items() if value is None and key not in base}
    assert model_type in CHECKED_TYPES and NONE_BY_DEFAULT[model_type] == nones


class _FromConfig:
    """Stands in for AutoModelFor*: from_config hands back the config it would build from."""

    @staticmethod
    def from_config(config: Any) -> Any:
        return config


@pytest.mark.parametrize("fmt", ["deepspeed", "lightning", "accelerate"])
@pytest.mark.parametrize("config_name", ["cpu", "llama", "bert"])
def test_trainers_that_take_the_model_in_code_are_told_how_to_build_it(fmt, config_name):
    """The line's code, run, gives the trained model's config, with the head of the trained objective."""
    from transformers import AutoConfig, GPT2Config

    config = CONFIGS[config_name]
    (line,) = [item for item in export(config, fmt).unexpressed if item.startswith("workload.model=")]
    code = line.split("`")[1]
    masked = config.workload.objective == "masked_lm"
    assert ("AutoModelForMaskedLM" in code) == masked
    namespace = {"AutoConfig": AutoConfig, "AutoModelForCausalLM": _FromConfig, "AutoModelForMaskedLM": _FromConfig,
                 "GPT2LMHeadModel": lambda c: c, "GPT2Config": GPT2Config}
    built = eval(code, namespace)  # the exporter's own text, in a test
    assert built.to_dict() == _expected_hf_config(config.workload).to_dict()


@pytest.mark.slow
def test_torchtitan_runs_a_llama_of_a_flavors_shape_as_that_flavor(tmp_path):
    """Llama 3.1 8B is llama3's 8B flavor: --config llama3_8b builds the same network and nothing is listed about it;
    a Llama-3.2-1B shape is flavor 1B, which no 0.3 config function builds, so the placeholder runs and it says so."""
    parsed = _load("llama8b", "torchtitan", tmp_path)
    w = CONFIGS["llama8b"].workload
    model = parsed.model_spec.model
    layer = model.layers[0]
    assert parsed.model_spec.flavor == "8B" and parsed.hf_assets_path == w.tokenizer
    assert (model.dim, len(model.layers), layer.attention.n_heads, layer.attention.n_kv_heads,
            layer.feed_forward.w1.out_features, model.vocab_size) == (
        w.n_embd, w.n_layer, w.n_head, w.kv_heads, w.ffn_width, w.vocab_size)
    assert not any(item.startswith("workload.model=") for item in export(CONFIGS["llama8b"], "torchtitan").unexpressed)
    toml = _load("llama8b", "torchtitan-toml", tmp_path)
    assert (toml["model"]["flavor"], toml["model"]["hf_assets_path"]) == ("8B", w.tokenizer)

    assert _load("llama", "torchtitan", tmp_path).model_spec.flavor == "debugmodel"
    (line,) = [i for i in export(CONFIGS["llama"], "torchtitan").unexpressed if i.startswith("workload.model=")]
    assert "flavor 1B" in line and "model_registry('1B')" in line
    for difference in ("vocabulary 128256 (the trial's: 32768", "RoPE frequency scaling", "RMSNorm eps 1e-05"):
        assert difference in line
    (line,) = [i for i in export(CONFIGS["llama"], "torchtitan-toml").unexpressed if i.startswith("workload.model=")]
    assert "torchtitan 0.2 does not have" in line
    (line,) = [i for i in export(CONFIGS["gpt2"], "torchtitan").unexpressed if i.startswith("workload.model=")]
    assert "is not a torchtitan model" in line


_LEGACY_FLAVORS_READ = """
import json, sys, torch
from torchtitan.models.llama3 import Transformer, llama3_args
out = {}
for name in sys.argv[1:]:
    a = llama3_args[name]
    with torch.device("meta"):
        layer = Transformer(a).layers["0"]
    s = a.rope_scaling_args
    out[name] = [a.dim, a.n_layers, a.n_heads, a.n_kv_heads or a.n_heads, layer.feed_forward.w1.out_features, False,
                 a.vocab_size, a.rope_theta, a.norm_eps,
                 [s.scaling_factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings]]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_llama3_flavor_table_is_torchtitans():
    """torchtitan.LLAMA3_FLAVORS against torchtitan 0.3's llama3_configs and 0.2's llama3_args; which flavors 0.3's
    config_registry functions build; and the RoPE and norm settings every flavor shares."""
    from torchtitan.models.llama3 import config_registry, llama3_configs

    from cotune.export.torchtitan import CONFIG_FUNCTIONS, LEGACY_FLAVORS, LLAMA3_FLAVORS, LLAMA31_ROPE

    assert set(llama3_configs) == set(LLAMA3_FLAVORS)
    for name, flavor in LLAMA3_FLAVORS.items():
        model = llama3_configs[name](attn_backend="flex")
        layer = model.layers[0]
        attention, rope = layer.attention, layer.attention.rope
        assert (model.dim, len(model.layers), attention.n_heads, attention.n_kv_heads or attention.n_heads,
                layer.feed_forward.w1.out_features, model.enable_weight_tying, model.vocab_size) == flavor, name
        assert (rope.theta, rope.scaling, model.norm.eps) == (500000, "llama", 1e-5)
        assert [rope.scaling_factor, rope.low_freq_factor, rope.high_freq_factor,
                rope.original_max_position_embeddings] == list(LLAMA31_ROPE.values())
    built: dict[str, list[str]] = {}
    for name in dir(config_registry):
        if name.startswith("llama3_") and callable(getattr(config_registry, name)):
            try:
                flavors = [getattr(config_registry, name)().model_spec.flavor]
            except ImportError:  # float8 / nvfp4 configs need torchao: read the flavor off the function instead
                flavors = re.findall(r'model_registry\(\s*"([^"]+)"', inspect.getsource(getattr(config_registry, name)))
            for flavor in flavors:
                built.setdefault(flavor, []).append(name)
    assert set(built) == set(CONFIG_FUNCTIONS) and all(CONFIG_FUNCTIONS[f] in names for f, names in built.items())

    if not (LEGACY_TORCHTITAN / "torchtitan").is_dir():
        pytest.fail(f"torchtitan 0.2.2 is not in {LEGACY_TORCHTITAN}")
    env = {**os.environ, "PYTHONPATH": str(LEGACY_TORCHTITAN)}
    done = subprocess.run([sys.executable, "-c", _LEGACY_FLAVORS_READ, *LEGACY_FLAVORS], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    legacy = json.loads(done.stdout.strip().splitlines()[-1])
    for name in LEGACY_FLAVORS:
        assert tuple(legacy[name][:7]) == LLAMA3_FLAVORS[name], name
        assert legacy[name][7:] == [500000, 1e-5, list(LLAMA31_ROPE.values())], name


@pytest.mark.parametrize("config_name", MODEL_CONFIGS)
def test_megatron_model_flags(config_name, tmp_path):
    """Shape for every model; GPT-2's architecture (Megatron's defaults) for gpt and hf:gpt2, Llama's from its config;
    a masked-LM model is pretrain_bert.py's, MLM only."""
    config = CONFIGS[config_name]
    w = config.workload
    out, path = _write(config, "megatron", tmp_path)
    args = LOADERS["megatron"](path, config)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (w.n_layer, w.n_embd, w.n_head)
    assert (args.num_query_groups if args.group_query_attention else args.num_attention_heads) == w.kv_heads
    assert args.ffn_hidden_size == w.ffn_width  # always written: with --swiglu Megatron's default is ~8h/3
    assert args.seq_length == w.seq_len and args.max_position_embeddings >= w.seq_len
    llama = w.model == "hf:llama"
    assert args.swiglu == llama and args.add_bias_linear == (not llama)
    assert (args.normalization or "LayerNorm", args.position_embedding_type or "learned_absolute") == (
        ("RMSNorm", "rope") if llama else ("LayerNorm", "learned_absolute"))
    if llama:
        assert args.rotary_base == 500000 and args.norm_epsilon == setting(w, "rms_norm_eps")
        assert args.untie_embeddings_and_output_weights == (not setting(w, "tie_word_embeddings"))
        assert (args.use_rope_scaling, args.rope_scaling_factor) == ((True, 8.0) if config_name == "llama8b"
                                                                     else (False, None))
    else:
        assert not args.untie_embeddings_and_output_weights
    masked = w.objective == "masked_lm"
    assert ("pretrain_bert.py" in out.text) == masked and ("pretrain_gpt.py" in out.text) == (not masked)
    if masked:
        assert args.bert_binary_head is False and args.mask_prob == 0.15 and args.norm_epsilon == 1e-12
        assert any(item.startswith("workload.model=hf:bert: pretrain_bert.py") for item in out.unexpressed)
    local_tokenizer = w.tokenizer != "bytes" and not w.tokenizer.startswith("bpe:")
    assert (args.tokenizer_type, args.tokenizer_model) == (
        ("HuggingFaceTokenizer", w.tokenizer) if local_tokenizer else (None, None))


@pytest.mark.parametrize("config_name", CONFIGS)
def test_deepspeed_values(config_name, tmp_path):
    config, ds = CONFIGS[config_name], _load(config_name, "deepspeed", tmp_path)
    par = config.parallel
    assert ds.train_batch_size == config.batch.global_batch_size
    assert ds.world_size == par.data_parallel
    assert ds.zero_optimization_stage == (3 if par.fsdp > 1 else 0)
    assert ds.train_micro_batch_size_per_gpu * ds.gradient_accumulation_steps == (
        config.batch.micro_batch_size * config.batch.grad_accum_steps)
    assert ds.gradient_clipping == config.optimizer.grad_clip
    assert ds.bfloat16_config.enabled == (config.precision.precision == "bf16")
    assert ds.float16_config.enabled == (config.precision.precision == "fp16")
    if ds.float16_config.enabled:
        assert ds.float16_config.loss_scale == 0  # dynamic, as the trial's GradScaler
    assert ds.optimizer_params["betas"] == [config.optimizer.adam_beta1, config.optimizer.adam_beta2]
    assert ds.scheduler_params["total_num_steps"] == budget_steps(config)
    assert ds.scheduler_params["cos_min_ratio"] == 0.1
    assert ds.tensor_parallel_config.autotp_size == (par.tp if par.tp > 1 else 0)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_lightning_values(config_name, tmp_path):
    config, cli = CONFIGS[config_name], _load(config_name, "lightning", tmp_path)
    trainer, par = cli.trainer, config.parallel
    assert trainer.accumulate_grad_batches == config.batch.grad_accum_steps
    assert trainer.gradient_clip_val == config.optimizer.grad_clip and trainer.gradient_clip_algorithm == "norm"
    assert trainer.max_steps == budget_steps(config)
    assert trainer.num_devices == par.world_size // par.pp
    if not _cuda(config) and (par.fsdp > 1 or par.tp > 1):
        expected = "DDPStrategy"  # Lightning shards on GPUs only; the file says so
    elif par.tp > 1:
        expected = "ModelParallelStrategy"
    elif par.fsdp > 1:
        expected = "FSDPStrategy"
    else:
        expected = "DDPStrategy" if par.dp > 1 else "SingleDeviceStrategy"
    assert type(trainer.strategy).__name__ == expected
    if expected == "FSDPStrategy":
        assert trainer.strategy.sharding_strategy.name == ("HYBRID_SHARD" if par.dp > 1 else "FULL_SHARD")
        if par.dp > 1:
            assert tuple(trainer.strategy.kwargs["device_mesh"]) == (par.dp, par.fsdp)
    if expected == "ModelParallelStrategy":
        assert (trainer.strategy._data_parallel_size, trainer.strategy._tensor_parallel_size) == (
            par.data_parallel, par.tp)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[config.precision.precision]
    assert trainer.precision == ("32-true" if par.tp > 1 and precision == "16-mixed" else precision)
    (group,) = cli.model.configure_optimizers().param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (
        config.optimizer.learning_rate, (config.optimizer.adam_beta1, config.optimizer.adam_beta2),
        config.optimizer.weight_decay)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_torchtitan_values(config_name, tmp_path):
    config, parsed = CONFIGS[config_name], _load(config_name, "torchtitan", tmp_path)
    t, p, par = parsed.training, parsed.parallelism, config.parallel
    assert (t.local_batch_size, t.global_batch_size, t.seq_len, t.steps) == (
        config.batch.micro_batch_size, config.batch.global_batch_size, config.workload.seq_len, budget_steps(config))
    assert t.mixed_precision_param == ("bfloat16" if config.precision.precision == "bf16" else "float32")
    assert (p.data_parallel_replicate_degree, p.data_parallel_shard_degree, p.tensor_parallel_degree,
            p.pipeline_parallel_degree, p.enable_sequence_parallel) == (par.dp, par.fsdp, par.tp, par.pp,
                                                                        par.sequence_parallel)
    if par.pp > 1:
        schedule = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B"}[par.pp_schedule]
        assert p.pipeline_parallel_schedule == schedule
        assert p.pipeline_parallel_microbatch_size * par.pp_microbatches == config.batch.micro_batch_size
        if par.pp_virtual_stages > 1:
            assert p.pipeline_parallel_layers_per_stage * par.pp * par.pp_virtual_stages == config.workload.n_layer
    s = parsed.lr_scheduler
    assert (s.warmup_steps, s.decay_ratio, s.decay_type, s.min_lr_factor) == (warmup_steps(config), None, "cosine", 0.1)
    (group,) = parsed.optimizer.param_groups
    assert group.optimizer_name == "AdamW" and group.optimizer_kwargs["lr"] == config.optimizer.learning_rate
    assert tuple(group.optimizer_kwargs["betas"]) == (config.optimizer.adam_beta1, config.optimizer.adam_beta2)
    assert parsed.compile.enable == config.software.compile
    checkpointing = type(parsed.activation_checkpoint).__qualname__
    assert checkpointing == ("FullAC.Config" if config.software.activation_checkpointing else "NoneType")


@pytest.mark.slow
@pytest.mark.parametrize("config_name", ["cpu", "3d"])
def test_torchtitan_toml_values(config_name, tmp_path):
    config, parsed = CONFIGS[config_name], _load(config_name, "torchtitan-toml", tmp_path)
    assert parsed["training"]["local_batch_size"] == config.batch.micro_batch_size
    assert parsed["training"]["global_batch_size"] == config.batch.global_batch_size
    assert parsed["parallelism"]["data_parallel_shard_degree"] == config.parallel.fsdp
    assert parsed["parallelism"]["tensor_parallel_degree"] == config.parallel.tp
    assert (parsed["optimizer"]["beta1"], parsed["optimizer"]["beta2"]) == (
        config.optimizer.adam_beta1, config.optimizer.adam_beta2)
    assert parsed["lr_scheduler"]["warmup_steps"] == warmup_steps(config)
    assert parsed["ac_mode"] == ("full" if config.software.activation_checkpointing else "none")


@pytest.mark.parametrize("config_name", CONFIGS)
def test_accelerate_values(config_name, tmp_path):
    config, (loaded, args) = CONFIGS[config_name], _load(config_name, "accelerate", tmp_path)
    par = config.parallel
    if par.fsdp > 1 or par.tp > 1:
        expected = "FSDP"  # accelerate takes tensor parallelism only through FSDP2's plugin
    elif par.world_size // par.pp > 1:
        expected = "MULTI_GPU" if _cuda(config) else "MULTI_CPU"
    else:
        expected = "NO"
    assert {"cpu": "NO", "ddp": "MULTI_GPU", "hsdp": "FSDP", "3d": "FSDP"}.get(config_name, expected) == expected
    assert loaded.distributed_type.value == expected
    assert loaded.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision.precision]
    assert args.num_processes == par.world_size // par.pp
    if expected == "FSDP":
        assert args.use_fsdp and str(args.fsdp_version) == "2"
        assert args.use_parallelism_config == (par.dp > 1 or par.tp > 1)
    if args.use_parallelism_config:
        assert (int(args.parallelism_config_dp_replicate_size), int(args.parallelism_config_dp_shard_size),
                int(args.parallelism_config_tp_size)) == (par.dp, par.fsdp, par.tp)
    assert args.dynamo_backend == ("INDUCTOR" if config.software.compile else "no")


@pytest.mark.parametrize("config_name", CONFIGS)
def test_megatron_values(config_name, tmp_path):
    config, args = CONFIGS[config_name], _load(config_name, "megatron", tmp_path)
    par = config.parallel
    assert args.global_batch_size == config.batch.global_batch_size
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (par.tp, par.pp)
    # Megatron counts micro batches per step as global / (micro * dp): the same sequences per step as the trial.
    data_parallel = par.world_size // (par.tp * par.pp)
    steps_of_micro = args.global_batch_size // (args.micro_batch_size * data_parallel)
    assert steps_of_micro == config.batch.grad_accum_steps * (par.pp_microbatches if par.pp > 1 else 1)
    assert args.sequence_parallel == (par.tp > 1 and par.sequence_parallel)
    assert (args.bf16, args.fp16) == (config.precision.precision == "bf16", config.precision.precision == "fp16")
    assert (args.lr, args.lr_warmup_fraction, args.lr_decay_style) == (
        config.optimizer.learning_rate, config.optimizer.warmup_fraction, "cosine")
    assert (args.weight_decay, args.adam_beta2, args.clip_grad) == (
        config.optimizer.weight_decay, config.optimizer.adam_beta2, config.optimizer.grad_clip)
    assert args.recompute_granularity == ("full" if config.software.activation_checkpointing else None)
    assert args.use_megatron_fsdp == (par.fsdp > 1) and args.use_distributed_optimizer == (par.fsdp > 1)


# --- picking a trial from a study --------------------------------------------------------------------------------


def _trial_config(i: int, runs: int | None = None) -> TrialConfig:
    """Trial ``i`` of ``_study``: the cpu config with a learning rate of its own (that of trial ``runs``: a repeat
    of that config) and seed ``i``."""
    cpu = CONFIGS["cpu"]
    lr = cpu.optimizer.learning_rate * (1 + (i if runs is None else runs) / 10)
    return replace(cpu, optimizer=replace(cpu.optimizer, learning_rate=lr), run=replace(cpu.run, seed=i))


def _study(
    tmp_path: Path, points: list[tuple[str, float, float, float]], repeats: dict[int, int] | None = None
) -> tuple[str, optuna.Study]:
    """A study as `cotune search` records one: per trial (status, tokens/s, val_loss, peak memory).

    Each trial runs a config of its own, except that trial i in ``repeats`` reruns trial ``repeats[i]``'s.
    """
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["tokens_per_second", "val_loss"])
    for i, (status, tps, loss, memory) in enumerate(points):
        attrs = {"status": status, "config": _trial_config(i, (repeats or {}).get(i)).to_dict(),
                 "metrics": {"tokens_per_second": tps, "val_loss": loss, "peak_memory_bytes": memory}}
        if status == "ok":
            study.add_trial(optuna.trial.create_trial(values=[tps, loss], user_attrs=attrs))
        else:
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs=attrs))
    return storage, study


POINTS = [  # trial: (status, tokens/s, val_loss, peak memory)
    ("ok", 100.0, 3.0, 4e8),  # 0: fastest
    ("ok", 90.0, 2.0, 3e8),   # 1: knee: normalised (0.11, 0.5), farthest below the line from 0 to 3
    ("ok", 50.0, 1.9, 1e8),   # 2: least memory on the front
    ("ok", 10.0, 1.0, 2e8),   # 3: lowest loss
    ("ok", 40.0, 2.5, 5e7),   # 4: dominated by 1 and 2, so off the front despite its memory
    ("oom", 0.0, 0.0, 0.0),   # 5: failed
]


@pytest.mark.parametrize("how, number", [("knee", 1), ("fastest", 0), ("lowest-loss", 3), ("lowest-memory", 2),
                                         ("trial:4", 4)])
def test_pick(how, number, tmp_path):
    _, study = _study(tmp_path, POINTS)
    picked = pick_trial(study, how)
    assert picked.number == number and picked.config == _trial_config(number) and picked.filled == []


# Fronts as (tokens/s, val loss), with x = (110 - tokens/s) / 100 and y = val loss - 1 each scaled to [0, 1]
# over the front: the extremes are (0, 1) and (1, 0), and the chord between them is x + y = 1.
BELOW_CHORD = [(110.0, 2.0), (105.0, 1.5), (80.0, 1.3), (10.0, 1.0)]  # (0.05, 0.5) is farthest below x + y = 1,
# while (0.3, 0.3) is nearer the ideal (0, 0): the knee is the first, trial 1.
BOTH_SIDES = [(110.0, 2.0), (100.0, 1.85), (50.0, 1.6), (10.0, 1.0)]  # (0.1, 0.85) below the chord, (0.6, 0.6)
# above it yet nearer the ideal: the knee is the one below, trial 1.
ABOVE_CHORD = [(110.0, 2.0), (80.0, 1.8), (50.0, 1.6), (10.0, 1.0)]  # a front that does not bend towards the ideal:
# every point above the chord, so the knee is the one nearest the ideal, (0.6, 0.6), trial 2.


@pytest.mark.parametrize("front, repeats, knee", [
    (BELOW_CHORD, {}, 1), (BOTH_SIDES, {}, 1), (ABOVE_CHORD, {}, 2),
    # Trial 4 reruns trial 3's config at (0.35, 0.18), which alone would be farthest below the chord; a config
    # is one choice, the first trial that ran it, in the report and in export alike.
    (BELOW_CHORD + [(75.0, 1.18)], {4: 3}, 1),
])
def test_report_and_export_agree_on_the_knee(front, repeats, knee, tmp_path):
    _, study = _study(tmp_path, [("ok", tps, loss, 1e8) for tps, loss in front], repeats)
    info = report_info(study)
    picked = pick_trial(study, "knee")
    assert info.knee == picked.number == knee
    assert "knee" in info.picks.loc[knee, "tags"] and len(info.picks) == len(front) - len(repeats)
    assert f"of the Pareto set of {len(info.picks)} configs" in picked.why
    if repeats:
        assert info.picks.loc[3, "repeats"] == 2 and 4 not in info.picks.index


@pytest.mark.parametrize("how, message", [
    ("trial:5", "trial 5 ended 'oom'"), ("trial:9", "has no trial 9"), ("trial:x", "must be a trial number"),
    ("best", "not a valid choice"),
])
def test_pick_errors(how, message, tmp_path):
    _, study = _study(tmp_path, POINTS)
    with pytest.raises(UserError, match=message):
        pick_trial(study, how)


def test_pick_in_a_study_without_an_ok_trial_is_a_user_error(tmp_path):
    _, study = _study(tmp_path, [("oom", 0.0, 0.0, 0.0)])
    with pytest.raises(UserError, match="no trial that finished ok"):
        pick_trial(study, "knee")


def test_config_from_an_older_cotune_gets_todays_defaults_and_says_which():
    stored = CONFIGS["cpu"].to_dict()
    del stored["parallel"]["sequence_parallel"], stored["parallel"]["pp_schedule"]
    config, filled = config_from_study(stored, 7)
    assert config == CONFIGS["cpu"] and filled == ["parallel.sequence_parallel", "parallel.pp_schedule"]
    stored["parallel"]["bogus"] = 1
    with pytest.raises(UserError, match="trial 7: .*bogus"):
        config_from_study(stored, 7)


# --- the command line ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_exports_every_format_to_a_folder_and_warns_what_is_lost(tmp_path):
    storage, _ = _study(tmp_path, POINTS)
    for fmt in EXPORTERS:
        done = run_cli("export", "--format", fmt, "--storage", storage, "-o", str(tmp_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "trial 1, the knee of the Pareto set of 4 configs" in done.stderr
        for item in export(_trial_config(1), fmt).unexpressed:
            assert f"warning: {fmt} cannot express {item}" in " ".join(done.stderr.split())
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s-trial-0001-"))
    assert written == sorted(f"s-trial-0001-{f}{export(_trial_config(1), f).suffix}" for f in EXPORTERS)
    stdout = run_cli("export", "--format", "hf", "--pick", "fastest", "--storage", storage, cwd=tmp_path)
    assert stdout.returncode == 0 and json.loads(stdout.stdout)["seed"] == 0


@pytest.mark.parametrize("args, message", [
    (["--format", "keras"], "--format 'keras' is not a known format"),
    (["--format", "hf", "--pick", "trial:5"], "trial 5 ended 'oom'"),
    (["--format", "hf", "--pick", "trial:99"], "has no trial 99"),
    (["--format", "hf", "--storage", "sqlite:///missing.db"], "there is no database file missing.db"),
    (["--format", "hf", "-o", "no/such/folder/x.json"], "does not exist"),
])
def test_cli_errors_are_one_sentence_and_exit_2(args, message, tmp_path):
    storage, _ = _study(tmp_path, POINTS)
    done = run_cli("export", "--storage", storage, *args, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "missing.db").exists()


def test_cli_export_of_an_empty_study_is_a_user_error(tmp_path):
    storage, _ = _study(tmp_path, [("oom", 0.0, 0.0, 0.0)])
    done = run_cli("export", "--format", "json", "--storage", storage, cwd=tmp_path)
    assert done.returncode == 2 and "no trial that finished ok" in done.stderr and not done.stdout


ROUND_TRIP_SPACE = """
name: export-round-trip
hardware: {device: cpu, nproc: 1}
workload: {model: gpt, n_layer: 1, n_embd: 32, n_head: 2, seq_len: 32, vocab_size: auto,
           data: builtin:stdlib-docstrings}
trial: {warmup_steps: 1, measured_steps: 2, token_budget: 4096, eval_tokens: 2048, timeout_s: 90}
objectives: [tokens_per_second, val_loss]
knobs:
  micro_batch_size: {choices: [4]}
  global_batch_size: {choices: [8]}
  precision: {choices: [fp32]}
  learning_rate: {low: 1.0e-3, high: 3.0e-3, log: true}
  activation_checkpointing: {choices: [true]}
"""


@pytest.mark.slow
def test_json_export_runs_with_cotune_trial_and_reproduces_the_config(tmp_path):
    """search (one real trial) -> export --format json -> cotune trial: the same config all the way."""
    (tmp_path / "space.yaml").write_text(ROUND_TRIP_SPACE)
    searched = run_cli("search", "--space", "space.yaml", "--budget", "1", "--seed", "0", cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout + searched.stderr
    exported = run_cli("export", "--format", "json", "--pick", "trial:0", "-o", "exported.json", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rerun = run_cli("trial", "exported.json", "--out", "again", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    recorded = tmp_path / "cotune-runs" / "export-round-trip" / "trial-0000" / "config.json"
    text = (tmp_path / "exported.json").read_text()
    assert json.loads(text) == json.loads((tmp_path / "again" / "config.json").read_text())
    assert json.loads(text) == json.loads(recorded.read_text())
    assert text == TrialConfig.load(recorded).to_json() + "\n"
