"""Exporters: every format is read back by its target library's own parser, values match the config,
``--pick`` chooses the right trial, and ``cotune export --format json`` round-trips through ``cotune trial``.

Libraries (CI installs them, see README): transformers, lightning, accelerate, deepspeed, torchtitan (>= 0.3,
needs triton) and torchtitan 0.2.2 in ``.ci/torchtitan-0.2`` for the legacy TOML. Megatron-LM's parser is not
installable (``megatron/training/arguments.py`` ships only in the Megatron-LM repository, not in the
``megatron-core`` wheel, and imports CUDA-only modules), so its flags are checked against a copy of them below.
This machine has no GPU: a config for ``cuda`` is loaded as noted in each loader.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
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
from cotune.export.base import budget_steps, warmup_steps
from cotune.export.pick import config_from_study, pick_trial
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


def _cuda(config: TrialConfig) -> bool:
    return config.run.device == "cuda"


# --- loaders: each reads an exported file with the target library and returns what it built ------------------


def load_json(path: Path, config: TrialConfig) -> TrialConfig:
    """cotune's own loader: the file is the config, exactly."""
    return TrialConfig.load(path)


def load_hf(path: Path, config: TrialConfig) -> Any:
    """HfArgumentParser(TrainingArguments): unknown keys are errors; a deprecated field's FutureWarning fails too.

    No GPU here: TrainingArguments refuses bf16 without one, so a cuda config is parsed with use_cpu=true.
    """
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    data = json.loads(path.read_text())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if _cuda(config):
            (args,) = parser.parse_dict({**data, "use_cpu": True})
        else:
            (args,) = parser.parse_json_file(str(path))
    deprecated = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)
                  and any(f"`{key}`" in str(w.message) for key in data)]
    assert not deprecated, deprecated
    return args


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
# _add_mixed_precision_args, _add_distributed_args, _add_data_args). True = store_true; a tuple = its choices.
MEGATRON_FLAGS: dict[str, type | bool | tuple[str, ...]] = {
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
    (same file) that these flags meet."""
    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    for flag, kind in MEGATRON_FLAGS.items():
        if kind is True:
            parser.add_argument(flag, action="store_true")
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
@pytest.mark.parametrize("fmt", sorted(LOADERS))
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
    code = ("import sys; from cotune.config import TrialConfig; from cotune.export import EXPORTERS, export\n"
            "[export(TrialConfig(), f) for f in EXPORTERS]\n"
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
    config, args = CONFIGS[config_name], _load(config_name, "hf", tmp_path)
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
    expected = {(1, 1): "SingleDeviceStrategy", (4, 1): "DDPStrategy", (2, 4): "FSDPStrategy"}.get(
        (par.dp, par.fsdp), "ModelParallelStrategy")
    assert type(trainer.strategy).__name__ == expected
    if expected == "FSDPStrategy":
        assert trainer.strategy.sharding_strategy.name == "HYBRID_SHARD"
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
        assert p.pipeline_parallel_schedule == "Interleaved1F1B"
        assert p.pipeline_parallel_microbatch_size * par.pp_microbatches == config.batch.micro_batch_size
        assert p.pipeline_parallel_layers_per_stage * par.pp * par.pp_virtual_stages == config.workload.n_layer
    s = parsed.lr_scheduler
    assert (s.warmup_steps, s.decay_ratio, s.decay_type, s.min_lr_factor) == (warmup_steps(config), None, "cosine", 0.1)
    (group,) = parsed.optimizer.param_groups
    assert group.optimizer_name == "AdamW" and group.optimizer_kwargs["lr"] == config.optimizer.learning_rate
    assert tuple(group.optimizer_kwargs["betas"]) == (config.optimizer.adam_beta1, config.optimizer.adam_beta2)
    assert parsed.compile.enable == config.software.compile
    checkpointing = type(parsed.activation_checkpoint).__qualname__
    assert checkpointing == ("FullAC.Config" if config.software.activation_checkpointing else "NoneType")


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
    expected = {"cpu": "NO", "ddp": "MULTI_GPU", "hsdp": "FSDP", "3d": "FSDP"}[config_name]
    assert loaded.distributed_type.value == expected
    assert loaded.mixed_precision == {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.precision.precision]
    assert args.num_processes == par.world_size // par.pp
    if expected == "FSDP":
        assert args.use_fsdp and str(args.fsdp_version) == "2"
        assert args.use_parallelism_config
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


def _study(tmp_path: Path, points: list[tuple[str, float, float, float]]) -> tuple[str, optuna.Study]:
    """A study as `cotune search` records one: per trial (status, tokens/s, val_loss, peak memory)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize", "minimize"])
    study.set_user_attr("objectives", ["tokens_per_second", "val_loss"])
    config = CONFIGS["cpu"].to_dict()
    for i, (status, tps, loss, memory) in enumerate(points):
        attrs = {"status": status, "config": {**config, "run": {**config["run"], "seed": i}},
                 "metrics": {"tokens_per_second": tps, "val_loss": loss, "peak_memory_bytes": memory}}
        if status == "ok":
            study.add_trial(optuna.trial.create_trial(values=[tps, loss], user_attrs=attrs))
        else:
            study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs=attrs))
    return storage, study


POINTS = [  # trial: (status, tokens/s, val_loss, peak memory)
    ("ok", 100.0, 3.0, 4e8),  # 0: fastest
    ("ok", 90.0, 2.0, 3e8),   # 1: knee: normalised (0.11, 0.5) is nearest (0, 0)
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
    assert picked.number == number and picked.config.run.seed == number and picked.filled == []


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


def test_cli_exports_every_format_to_a_folder_and_warns_what_is_lost(tmp_path):
    storage, _ = _study(tmp_path, POINTS)
    for fmt in EXPORTERS:
        done = run_cli("export", "--format", fmt, "--storage", storage, "-o", str(tmp_path), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "trial 1, the knee of the Pareto set of 4 trials" in done.stderr
        for item in export(CONFIGS["cpu"], fmt).unexpressed:
            assert f"warning: {fmt} cannot express {item}" in " ".join(done.stderr.split())
    written = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s-trial-0001-"))
    assert written == sorted(f"s-trial-0001-{f}{export(CONFIGS['cpu'], f).suffix}" for f in EXPORTERS)
    stdout = run_cli("export", "--format", "hf", "--pick", "fastest", "--storage", storage, cwd=tmp_path)
    assert stdout.returncode == 0 and json.loads(stdout.stdout)["seed"] == 0


@pytest.mark.parametrize("args, message", [
    (["--format", "keras"], "--format 'keras' is not a known format"),
    (["--format", "hf", "--pick", "trial:5"], "trial 5 ended 'oom'"),
    (["--format", "hf", "--pick", "trial:99"], "has no trial 99"),
    (["--format", "hf", "--storage", "sqlite:///missing.db"], "no such database file"),
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
