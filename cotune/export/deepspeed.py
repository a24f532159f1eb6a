"""``deepspeed``: a DeepSpeed config JSON (``deepspeed.initialize(config=...)``).

Sharding maps to ZeRO: fsdp > 1 shards parameters, gradients and optimizer state
(FSDP's full sharding), which is ZeRO stage 3; without it, stage 0 (plain data
parallel). With pipeline parallelism a DeepSpeed micro batch is one pipeline
micro-batch, so the trial's micro batch splits into pp_microbatches of them.
"""

from __future__ import annotations

import json

from cotune.config import TrialConfig
from cotune.export.architecture import in_code
from cotune.export.base import (
    ADAM_EPS,
    MIN_LR_RATIO,
    Exported,
    budget_steps,
    kernel_notes,
    knob,
    launcher_note,
    pipeline_micro_batch,
    pipeline_value,
    register,
    warmup_steps,
)

# torch.amp.GradScaler's defaults, which the trial's fp16 uses: start at 2**16, grow after 2000 good steps.
_FP16_SCALER = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 2000, "hysteresis": 1}


@register("deepspeed")
def export_deepspeed(config: TrialConfig) -> Exported:
    """Batch sizes, precision block, ZeRO stage, AdamW, warm-up + cosine scheduler, checkpointing."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    precision = config.precision.precision
    steps, warmup = budget_steps(config), warmup_steps(config)
    pipeline_chunks = par.pp_microbatches if par.pp > 1 else 1
    ds: dict = {
        # train_batch_size = micro * accumulation * data-parallel ranks (dp * fsdp); DeepSpeed checks it.
        "train_batch_size": b.global_batch_size,
        "train_micro_batch_size_per_gpu": pipeline_micro_batch(config),
        "gradient_accumulation_steps": b.grad_accum_steps * pipeline_chunks,
        "gradient_clipping": opt.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": opt.learning_rate, "betas": [opt.adam_beta1, opt.adam_beta2], "eps": ADAM_EPS,
                       "weight_decay": opt.weight_decay},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": steps, "warmup_min_ratio": 0.0, "warmup_num_steps": max(1, warmup),
                       "warmup_type": "linear", "cos_min_ratio": MIN_LR_RATIO},
        },
        "zero_optimization": {"stage": 3 if par.fsdp > 1 else 0},
    }
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, **_FP16_SCALER}
    if sw.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                          "cpu_checkpointing": False}
    if par.tp > 1:
        ds["tensor_parallel"] = {"autotp_size": par.tp}  # DeepSpeed AutoTP training

    lost = launcher_note(config, f"deepspeed --num_gpus {par.world_size}") + kernel_notes(config)
    lost.append(in_code(config, "DeepSpeed", "and pass it to deepspeed.initialize(model=...)"))
    lost.append(knob("optimizer.weight_decay", opt.weight_decay,
                     "the trial exempts biases and norm weights (tensors under 2-D); DeepSpeed decays every "
                     "parameter group deepspeed.initialize gets, so pass those with weight_decay 0.0"))
    if warmup == 0:
        lost.append(knob("optimizer.warmup_fraction", opt.warmup_fraction,
                         "the trial has no warm-up, but WarmupCosineLR always warms up for at least one step"))
    if sw.activation_checkpointing:
        lost.append(knob("software.activation_checkpointing", True,
                         "the activation_checkpointing block only configures deepspeed.checkpointing; the model "
                         "must call deepspeed.checkpointing.checkpoint around each block"))
    if sw.compile:
        lost.append(knob("software.compile", True, "DeepSpeed's config cannot turn on torch.compile; call "
                         "engine.compile() after deepspeed.initialize"))
    if par.dp > 1 and par.fsdp > 1:
        lost.append(knob("parallel.dp", par.dp, f"HSDP (replicate over {par.dp} groups, shard within {par.fsdp}) "
                         f"has no ZeRO equivalent: stage 3 shards across all {par.data_parallel} ranks"))
    if par.tp > 1 and par.sequence_parallel:
        lost.append(knob("parallel.sequence_parallel", True, "AutoTP has no Megatron-style sequence parallelism"))
    if par.pp > 1:
        lost.append(knob("parallel.pp", pipeline_value(config),
                         f"pipeline stages are set in code: PipelineModule(layers, num_stages={par.pp}); "
                         "DeepSpeed runs its own 1F1B-style schedule"))
    return Exported(text=json.dumps(ds, indent=2) + "\n", unexpressed=lost, suffix=".json")
