"""``lightning``: Lightning ``Trainer`` arguments plus AdamW, as a LightningCLI YAML config.

``python train.py fit --config lightning.yaml`` with a LightningCLI script: ``trainer:``
holds the Trainer's arguments (precision, devices, strategy with its own options,
accumulation, clipping), ``optimizer:`` the AdamW settings LightningCLI builds for
the model. The learning-rate schedule and the micro-batch size live in user code
(``configure_optimizers``, the DataLoader), so they are listed as comments.
"""

from __future__ import annotations

import yaml

from cotune.config import TrialConfig
from cotune.export.architecture import in_code
from cotune.export.base import (
    ADAM_EPS,
    MIN_LR_RATIO,
    Exported,
    budget_steps,
    comment_header,
    kernel_notes,
    knob,
    pipeline_value,
    register,
    warmup_steps,
)

_PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}  # 16-mixed: autocast + GradScaler


def _strategy(config: TrialConfig) -> str | dict:
    par = config.parallel
    if config.run.device == "cpu" and (par.fsdp > 1 or par.tp > 1):
        return "ddp"  # FSDPStrategy and ModelParallelStrategy refuse a CPU accelerator (listed in export_lightning)
    if par.tp > 1:
        # FSDP2 + tensor parallel on a 2-D mesh; the model applies both in configure_model.
        return {"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                "init_args": {"data_parallel_size": par.data_parallel, "tensor_parallel_size": par.tp}}
    if par.fsdp > 1:
        init: dict = {"sharding_strategy": "FULL_SHARD"}
        if par.dp > 1:  # HSDP: replicate across dp groups, shard within each group of fsdp ranks
            init = {"sharding_strategy": "HYBRID_SHARD", "device_mesh": [par.dp, par.fsdp]}
        return {"class_path": "lightning.pytorch.strategies.FSDPStrategy", "init_args": init}
    return "ddp" if par.dp > 1 else "auto"


@register("lightning")
def export_lightning(config: TrialConfig) -> Exported:
    """Trainer arguments and LightningCLI's optimizer block; the rest as comments."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    steps, warmup = budget_steps(config), warmup_steps(config)
    lost = kernel_notes(config) + [in_code(config, "Lightning", "in your LightningModule's configure_model")]
    precision = _PRECISION[config.precision.precision]
    if par.tp > 1 and precision == "16-mixed":
        # ModelParallelStrategy refuses 16-mixed (fp16 with a loss scaler); 16-true would drop the scaler.
        precision = "32-true"
        lost.append(knob("precision.precision", "fp16", "ModelParallelStrategy has no 16-mixed (fp16 with loss "
                         "scaling); 32-true is written"))
    doc = {
        "seed_everything": config.run.seed,
        "trainer": {
            "accelerator": "gpu" if config.run.device == "cuda" else "cpu",
            "devices": par.world_size // par.pp,  # no pipeline stages here: the other degrees tile these
            "num_nodes": 1,
            "strategy": _strategy(config),
            "precision": precision,
            "accumulate_grad_batches": b.grad_accum_steps,
            "gradient_clip_val": opt.grad_clip,
            "gradient_clip_algorithm": "norm",
            "max_steps": steps,
        },
        "optimizer": {
            "class_path": "torch.optim.AdamW",
            "init_args": {"lr": opt.learning_rate, "betas": [opt.adam_beta1, opt.adam_beta2], "eps": ADAM_EPS,
                          "weight_decay": opt.weight_decay},
        },
    }
    lost += [
        knob("batch.micro_batch_size", b.micro_batch_size,
             "the DataLoader's batch_size (your DataModule's, e.g. data.init_args.batch_size)"),
        knob("optimizer.warmup_fraction", opt.warmup_fraction,
             f"LightningCLI's lr_scheduler takes one torch scheduler; in configure_optimizers use "
             f"SequentialLR([LinearLR(start_factor=1/{max(1, warmup)}, total_iters={warmup}), "
             f"CosineAnnealingLR(T_max={steps - warmup}, eta_min={MIN_LR_RATIO}*lr)], milestones=[{warmup}]) "
             "stepped every optimizer step"),
        knob("optimizer.weight_decay", opt.weight_decay,
             "the trial exempts biases and norm weights (tensors under 2-D); LightningCLI's optimizer decays "
             "every parameter, so build two param groups in configure_optimizers"),
    ]
    sharded_on_cpu = config.run.device == "cpu" and (par.fsdp > 1 or par.tp > 1)
    for name, value in (("parallel.fsdp", par.fsdp), ("parallel.tp", par.tp)):
        if sharded_on_cpu and value > 1:
            lost.append(knob(name, value, "Lightning shards (FSDPStrategy, ModelParallelStrategy) on GPUs only; on "
                             f"CPU this file replicates the model with DDP on {par.world_size // par.pp} processes"))
    if sw.activation_checkpointing:
        how = ("pass activation_checkpointing_policy={YourBlock} to FSDPStrategy"
               if par.fsdp > 1 and par.tp == 1 and not sharded_on_cpu
               else "wrap each block with torch.utils.checkpoint in the model")
        lost.append(knob("software.activation_checkpointing", True, f"the Trainer has no switch for it; {how}"))
    if sw.compile:
        lost.append(knob("software.compile", True, "the Trainer has no switch for it; torch.compile the model "
                         "in configure_model"))
    if par.tp > 1 and not sharded_on_cpu:
        lost.append(knob("parallel.tp", par.tp, "ModelParallelStrategy gives the 2-D device mesh; the tensor-"
                         "parallel plan is applied in configure_model"))
        if par.dp > 1 and par.fsdp > 1:
            lost.append(knob("parallel.dp", par.dp, "ModelParallelStrategy has one data-parallel mesh dimension "
                             f"of {par.data_parallel}; HSDP's replicate degree needs your own mesh"))
        if par.sequence_parallel:
            lost.append(knob("parallel.sequence_parallel", True, "part of the tensor-parallel plan in "
                             "configure_model (SequenceParallel on the norms)"))
    if par.pp > 1:
        lost.append(knob("parallel.pp", pipeline_value(config), "Lightning has no pipeline-parallel strategy; "
                         f"this file runs the other degrees on {par.world_size // par.pp} devices"))
    header = comment_header("Lightning Trainer arguments exported by cotune (LightningCLI config)",
                            "python train.py fit --config this.yaml (a LightningCLI script)", lost)
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return Exported(text=header + body, unexpressed=lost, suffix=".yaml")
