"""``accelerate``: an accelerate config YAML (``accelerate launch --config_file this.yaml train.py``).

The file covers how processes launch and shard: distributed_type, mixed_precision,
num_processes, FSDP2 settings and the parallelism sizes (dp_replicate / dp_shard /
tp). The training loop's knobs (batch, AdamW, schedule, clipping) live in the
user's script, so they are listed as comments.
"""

from __future__ import annotations

import yaml

from cotune.config import TrialConfig
from cotune.export.architecture import in_code
from cotune.export.base import (
    Exported,
    budget_steps,
    comment_header,
    kernel_notes,
    knob,
    pipeline_value,
    register,
    warmup_steps,
)

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # accelerate's fp16 uses a dynamic GradScaler


def _loop_knobs(config: TrialConfig) -> list[str]:
    """Training-loop knobs an accelerate config has no place for."""
    b, opt = config.batch, config.optimizer
    steps, warmup = budget_steps(config), warmup_steps(config)
    return [
        knob("batch.micro_batch_size", b.micro_batch_size, "your DataLoader's batch_size"),
        knob("batch.grad_accum_steps", b.grad_accum_steps,
             f"Accelerator(gradient_accumulation_steps={b.grad_accum_steps}) in code "
             f"(global batch {b.global_batch_size})"),
        knob("optimizer.learning_rate", opt.learning_rate, "torch.optim.AdamW(lr=...) in code"),
        knob("optimizer.adam_beta1", opt.adam_beta1, "AdamW(betas=(beta1, beta2)) in code"),
        knob("optimizer.adam_beta2", opt.adam_beta2, "AdamW(betas=(beta1, beta2)) in code"),
        knob("optimizer.weight_decay", opt.weight_decay,
             "AdamW param groups in code: decay tensors of 2-D and up, 0.0 for biases and norm weights"),
        knob("optimizer.warmup_fraction", opt.warmup_fraction,
             f"schedule in code: linear warm-up over {warmup} of {steps} steps, then cosine to 10% of the peak"),
        knob("optimizer.grad_clip", opt.grad_clip, "accelerator.clip_grad_norm_(params, max_norm) in code"),
    ]


@register("accelerate")
def export_accelerate(config: TrialConfig) -> Exported:
    """distributed_type, mixed_precision, num_processes, fsdp_config, parallelism_config, dynamo_config."""
    par, sw = config.parallel, config.software
    cpu = config.run.device == "cpu"
    sharded = par.fsdp > 1 or par.tp > 1  # accelerate takes tensor parallelism only through FSDP2's plugin
    if sharded:
        distributed_type = "FSDP"
    elif par.world_size // par.pp > 1:
        distributed_type = "MULTI_CPU" if cpu else "MULTI_GPU"
    else:
        distributed_type = "NO"
    doc: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "mixed_precision": _MIXED[config.precision.precision],
        "use_cpu": cpu,
        "num_processes": par.world_size // par.pp,  # no pipeline stages here: the other degrees tile these
        "num_machines": 1,
        "machine_rank": 0,
        "main_training_function": "main",
        "rdzv_backend": "static",
        "same_network": True,
        "debug": False,
    }
    lost = [in_code(config, "accelerate", "and pass it to accelerator.prepare")] + _loop_knobs(config) + kernel_notes(config)
    if sharded:
        doc["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_reshard_after_forward": True,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_activation_checkpointing": sw.activation_checkpointing,
        }
        if par.dp > 1 or par.tp > 1:
            doc["parallelism_config"] = {
                "parallelism_config_dp_replicate_size": par.dp,
                "parallelism_config_dp_shard_size": par.fsdp,
                "parallelism_config_tp_size": par.tp,
            }
        if par.dp > 1 and par.fsdp == 1:
            lost.append(knob("parallel.dp", par.dp, "accelerate's ParallelismConfig rejects dp_replicate_size > 1 "
                             "with dp_shard_size 1 (plain replication next to tensor parallelism)"))
    elif sw.activation_checkpointing:
        lost.append(knob("software.activation_checkpointing", True, "accelerate's config switches it only for "
                         "FSDP; wrap each block with torch.utils.checkpoint in the model"))
    if sw.compile:
        doc["dynamo_config"] = {"dynamo_backend": "INDUCTOR"}
    if par.tp > 1 and par.sequence_parallel:
        lost.append(knob("parallel.sequence_parallel", True, "accelerate's sp_size is Ulysses-style sequence "
                         "parallelism, not tensor parallelism's; apply SequenceParallel in the model's TP plan"))
    if par.pp > 1:
        lost.append(knob("parallel.pp", pipeline_value(config), "an accelerate config has no pipeline "
                         f"parallelism; this file runs the other degrees on {par.world_size // par.pp} processes"))
    header = comment_header("accelerate config exported by cotune",
                            "accelerate launch --config_file this.yaml train.py", lost)
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return Exported(text=header + body, unexpressed=lost, suffix=".yaml")
