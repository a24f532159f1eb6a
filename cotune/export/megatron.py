"""``megatron``: Megatron-LM command-line arguments (``pretrain_gpt.py``), one per line.

Megatron's data-parallel size is what the world size leaves after tp * pp, its
``--micro-batch-size`` is one pipeline micro-batch, and its micro-batch count per step
is global / (micro * dp): so with pipeline parallelism the trial's micro batch splits
into pp_microbatches of them, the same sequences per step. fsdp > 1 maps to
Megatron-FSDP with full sharding (parameters, gradients, optimizer state).
"""

from __future__ import annotations

from cotune.config import TrialConfig
from cotune.export.base import (
    ADAM_EPS,
    MIN_LR_RATIO,
    Exported,
    budget_steps,
    comment_header,
    kernel_notes,
    knob,
    launcher_note,
    pipeline_micro_batch,
    register,
)


def _flag(name: str, value: object = None) -> str:
    if value is None:
        return f"--{name}"
    return f"--{name} {value!r}" if isinstance(value, float) else f"--{name} {value}"


@register("megatron")
def export_megatron(config: TrialConfig) -> Exported:
    """Parallel sizes, batch sizes, model shape, precision, AdamW, schedule, recompute, sharding."""
    b, par, opt, sw, w = config.batch, config.parallel, config.optimizer, config.software, config.workload
    precision = config.precision.precision
    args = [
        _flag("tensor-model-parallel-size", par.tp),
        _flag("pipeline-model-parallel-size", par.pp),
    ]
    if par.pp > 1 and par.pp_virtual_stages > 1:
        args.append(_flag("num-virtual-stages-per-pipeline-rank", par.pp_virtual_stages))
    if par.tp > 1 and par.sequence_parallel:
        args.append(_flag("sequence-parallel"))
    args += [
        _flag("micro-batch-size", pipeline_micro_batch(config)),
        _flag("global-batch-size", b.global_batch_size),
        # The workload's shape: a GPT-2 style decoder (learned positions, LayerNorm, GELU, tied embeddings,
        # no dropout), which are Megatron's GPT defaults apart from dropout.
        _flag("num-layers", w.n_layer),
        _flag("hidden-size", w.n_embd),
        _flag("num-attention-heads", w.n_head),
        _flag("seq-length", w.seq_len),
        _flag("max-position-embeddings", w.seq_len),
        _flag("attention-dropout", 0.0),
        _flag("hidden-dropout", 0.0),
        _flag("train-iters", budget_steps(config)),
        _flag("optimizer", "adam"),  # Megatron's adam decays decoupled (AdamW) and skips biases and norms
        _flag("lr", opt.learning_rate),
        _flag("min-lr", opt.learning_rate * MIN_LR_RATIO),
        _flag("lr-decay-style", "cosine"),
        _flag("lr-warmup-fraction", opt.warmup_fraction),
        _flag("weight-decay", opt.weight_decay),
        _flag("adam-beta1", opt.adam_beta1),
        _flag("adam-beta2", opt.adam_beta2),
        _flag("adam-eps", ADAM_EPS),
        _flag("clip-grad", opt.grad_clip),
        _flag("seed", config.run.seed),
    ]
    if precision == "bf16":
        args.append(_flag("bf16"))
    elif precision == "fp16":
        # Dynamic loss scaling as torch.amp.GradScaler does it: start at 2**16, halve on every overflow,
        # double after 2000 good steps.
        args += [_flag("fp16"), _flag("initial-loss-scale", 65536), _flag("loss-scale-window", 2000),
                 _flag("hysteresis", 1)]
    if sw.activation_checkpointing:
        # The trial checkpoints every transformer block whole.
        args += [_flag("recompute-granularity", "full"), _flag("recompute-method", "uniform"),
                 _flag("recompute-num-layers", 1)]
    if par.fsdp > 1:
        args += [_flag("use-megatron-fsdp"), _flag("data-parallel-sharding-strategy", "optim_grads_params"),
                 _flag("use-distributed-optimizer"), _flag("ckpt-format", "fsdp_dtensor")]

    lost = launcher_note(config, f"torchrun --nproc-per-node {par.world_size} pretrain_gpt.py") + kernel_notes(config)
    if sw.compile:
        lost.append(knob("software.compile", True, "Megatron-LM has no torch.compile switch (it uses fused kernels)"))
    if par.dp > 1 and par.fsdp > 1:
        lost.append(knob("parallel.dp", par.dp, f"HSDP's replicate degree: Megatron-FSDP here shards across all "
                         f"{par.data_parallel} data-parallel ranks"))
    if par.pp > 1 and par.pp_schedule == "gpipe":
        lost.append(knob("parallel.pp_schedule", "gpipe", "Megatron runs 1F1B (interleaved with virtual stages); "
                         "it has no GPipe schedule"))
    header = comment_header(
        "Megatron-LM arguments exported by cotune",
        f"torchrun --nproc-per-node {par.world_size} pretrain_gpt.py $(grep -v '^#' this.args) "
        "--data-path ... --tokenizer-type ... (one argument per line)",
        lost,
    )
    return Exported(text=header + "\n".join(args) + "\n", unexpressed=lost, suffix=".args")
