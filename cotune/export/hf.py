"""``hf``: Hugging Face ``transformers.TrainingArguments`` as JSON, in the 5.x form.

transformers 5 dropped ``warmup_ratio``: a float ``warmup_steps`` below 1 is the
ratio now, and ``activation_checkpointing`` replaced ``gradient_checkpointing``
(kept as a deprecated alias until v6). Load it with
``HfArgumentParser(TrainingArguments).parse_json_file(path)``.
"""

from __future__ import annotations

import json

from cotune.config import TrialConfig
from cotune.export.base import (
    ADAM_EPS,
    MIN_LR_RATIO,
    Exported,
    budget_steps,
    kernel_notes,
    knob,
    launcher_note,
    pipeline_value,
    register,
)

_NO_PARALLEL_CONFIG = (
    "TrainingArguments takes tensor parallelism and HSDP only as an accelerate ParallelismConfig object, "
    "which a JSON file cannot hold; pass parallelism_config=ParallelismConfig(dp_replicate_size={dp}, "
    "dp_shard_size={fsdp}, tp_size={tp}) in code"
)


@register("hf")
def export_hf(config: TrialConfig) -> Exported:
    """TrainingArguments fields for the trial's batch, precision, AdamW, schedule and sharding."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    precision = config.precision.precision
    args: dict = {
        "per_device_train_batch_size": b.micro_batch_size,
        "gradient_accumulation_steps": b.grad_accum_steps,
        "max_steps": budget_steps(config),
        "learning_rate": opt.learning_rate,
        # The trial warms up linearly, then decays by cosine to 10% of the peak.
        "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": MIN_LR_RATIO},
        "warmup_steps": opt.warmup_fraction,  # a float below 1 is a fraction of max_steps in transformers 5
        "weight_decay": opt.weight_decay,  # the Trainer exempts biases and LayerNorm weights, as the trial does
        "adam_beta1": opt.adam_beta1,
        "adam_beta2": opt.adam_beta2,
        "adam_epsilon": ADAM_EPS,
        "optim": "adamw_torch_fused" if config.run.device == "cuda" else "adamw_torch",
        "max_grad_norm": opt.grad_clip,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",  # the Trainer's fp16 uses a dynamic GradScaler, as the trial does
        "torch_compile": sw.compile,
        "seed": config.run.seed,
        "use_cpu": config.run.device == "cpu",
    }
    if par.fsdp > 1:
        # FSDP2 (fully_shard), as the trial shards; FSDP's own checkpointing avoids a redundant all-gather.
        args["fsdp"] = True
        args["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": True,
            "activation_checkpointing": sw.activation_checkpointing,
        }
        args["activation_checkpointing"] = False
    else:
        args["activation_checkpointing"] = sw.activation_checkpointing

    lost = launcher_note(config, f"torchrun --nproc-per-node {par.world_size}") + kernel_notes(config)
    parallel_config = _NO_PARALLEL_CONFIG.format(dp=par.dp, fsdp=par.fsdp, tp=par.tp)
    if par.tp > 1:
        lost.append(knob("parallel.tp", par.tp, parallel_config))
        if par.sequence_parallel:
            lost.append(knob("parallel.sequence_parallel", True,
                             "the Trainer has no switch for sequence parallelism; it comes with the model's tp_plan"))
    if par.dp > 1 and par.fsdp > 1:
        lost.append(knob("parallel.dp", par.dp, "with fsdp > 1 this is HSDP's replicate degree; " + parallel_config))
    if par.pp > 1:
        lost.append(knob("parallel.pp", pipeline_value(config), "the HF Trainer has no pipeline parallelism; run the other "
                         f"degrees on {par.world_size // par.pp} processes"))
    return Exported(text=json.dumps(args, indent=2) + "\n", unexpressed=lost, suffix=".json")
