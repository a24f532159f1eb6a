"""``torchtitan`` and ``torchtitan-toml``: torchtitan's training settings.

Since torchtitan 0.3 a run is ``--module M --config C`` (a config_registry function)
followed by ``--section.key value`` overrides parsed by ``ConfigManager.parse_args``,
which rejects unknown keys. ``torchtitan`` writes those arguments as a file, one per
line; ``torchtitan-toml`` writes the JobConfig TOML that releases up to 0.2 read with
``--job.config_file``. Both keep cotune's names: dp is the replicate degree, fsdp
the shard degree, as torchtitan's ParallelDims has them.
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
    warmup_steps,
)

# torchtitan resolves these through torch.distributed.pipelining's get_schedule_class.
_SCHEDULES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B"}
# A torchtitan model stands in for cotune's workload, which torchtitan does not ship.
PLACEHOLDER_MODULE, PLACEHOLDER_CONFIG, PLACEHOLDER_FLAVOR = "llama3", "llama3_debugmodel", "debugmodel"


def _settings(config: TrialConfig) -> tuple[dict[str, dict], list[str]]:
    """The values both layouts share, by section, and what neither can express."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    w = config.workload
    precision = config.precision.precision
    lost = launcher_note(config, f"NGPU={par.world_size} ./run_train.sh, or torchrun --nproc-per-node "
                                 f"{par.world_size} -m torchtitan.train") + kernel_notes(config)
    lost.append(knob("workload.model", w.model, f"cotune's model ({w.n_layer} layers, {w.n_embd} wide, {w.n_head} "
                     f"heads) is not a torchtitan model; {PLACEHOLDER_MODULE}/{PLACEHOLDER_CONFIG} stands in, "
                     "replace it with your own"))
    if precision == "fp16":
        lost.append(knob("precision.precision", "fp16", "torchtitan trains in bfloat16 or float32 only "
                         "(no fp16 loss scaling); float32 is written"))
    lost.append(knob("optimizer.weight_decay", opt.weight_decay,
                     "the trial exempts biases and norm weights (tensors under 2-D); torchtitan's AdamW decays "
                     "every parameter"))
    training = {
        "local_batch_size": b.micro_batch_size,
        "global_batch_size": b.global_batch_size,  # torchtitan derives accumulation from it, as the trial does
        "seq_len": w.seq_len,
        "steps": budget_steps(config),
        "max_norm": opt.grad_clip,
        "mixed_precision_param": "bfloat16" if precision == "bf16" else "float32",
    }
    parallelism: dict = {
        "data_parallel_replicate_degree": par.dp,
        "data_parallel_shard_degree": par.fsdp,
        "tensor_parallel_degree": par.tp,
        "pipeline_parallel_degree": par.pp,
    }
    if par.pp > 1:
        parallelism["pipeline_parallel_schedule"] = _SCHEDULES[par.pp_schedule]
        parallelism["pipeline_parallel_microbatch_size"] = pipeline_micro_batch(config)
        stages = par.pp * par.pp_virtual_stages
        if par.pp_virtual_stages > 1:
            parallelism["pipeline_parallel_layers_per_stage"] = w.n_layer // stages
    lr_scheduler = {
        "warmup_steps": warmup_steps(config),
        "decay_type": "cosine",
        "min_lr_factor": MIN_LR_RATIO,
    }
    optimizer = {"lr": opt.learning_rate, "betas": [opt.adam_beta1, opt.adam_beta2], "eps": ADAM_EPS,
                 "weight_decay": opt.weight_decay}
    sections = {"training": training, "parallelism": parallelism, "lr_scheduler": lr_scheduler,
                "optimizer": optimizer, "compile": {"enable": sw.compile},
                "activation_checkpoint": {"mode": "full" if sw.activation_checkpointing else "none"},
                "debug": {"seed": config.run.seed}}
    return sections, lost


def _arg(value: object) -> str:
    if isinstance(value, list):
        return " ".join(_arg(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


@register("torchtitan")
def export_torchtitan(config: TrialConfig) -> Exported:
    """``--module/--config`` then ``--section.key value`` overrides, one per line, for torchtitan >= 0.3."""
    sections, lost = _settings(config)
    par = config.parallel
    sections["parallelism"]["enable_sequence_parallel"] = par.sequence_parallel  # torchtitan's default is on
    # The registry's configs set a stable phase (decay_ratio 0.8); the trial decays right after warm-up.
    sections["lr_scheduler"]["decay_ratio"] = None
    if par.pp > 1:
        sections["training"]["disable_cuda_graphs"] = True  # 0.3 refuses CUDA graphs with pipeline parallelism
    lines = [f"--module {PLACEHOLDER_MODULE}", f"--config {PLACEHOLDER_CONFIG}"]
    for section in ("training", "parallelism", "lr_scheduler", "compile", "debug"):
        for key, value in sections[section].items():
            if isinstance(value, bool):  # tyro flags: --section.key / --section.no_key
                lines.append(f"--{section}.{key}" if value else f"--{section}.no_{key}")
            else:
                lines.append(f"--{section}.{key} {_arg(value)}")
    # 0.3 keeps AdamW's settings per parameter group; the registry's default has one catch-all group.
    group = "--optimizer.param_groups.0"
    lines.append(f"{group}.optimizer_name AdamW")
    for key, value in sections["optimizer"].items():
        lines.append(f"{group}.optimizer_kwargs.{key} {_arg(value)}")
    # Activation checkpointing is a tyro subcommand, so it comes last.
    lines.append(f"activation-checkpoint:{sections['activation_checkpoint']['mode']}")
    usage = (f"torchrun --nproc-per-node {par.world_size} -m torchtitan.train $(grep -v '^#' this.args) "
             "(one argument per line)")
    header = comment_header("torchtitan (>= 0.3) arguments exported by cotune", usage, lost)
    return Exported(text=header + "\n".join(lines) + "\n", unexpressed=lost, suffix=".args")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value) if isinstance(value, float) else str(value)


@register("torchtitan-toml")
def export_torchtitan_toml(config: TrialConfig) -> Exported:
    """The JobConfig TOML of torchtitan releases up to 0.2 (``--job.config_file``)."""
    sections, lost = _settings(config)
    par = config.parallel
    if par.tp > 1 and not par.sequence_parallel:
        lost.append(knob("parallel.sequence_parallel", False, "torchtitan up to 0.2 always uses sequence "
                         "parallelism with tensor parallelism"))
    opt = sections.pop("optimizer")
    beta1, beta2 = opt.pop("betas")
    sections = {
        "job": {"description": "cotune export"},
        "model": {"name": PLACEHOLDER_MODULE, "flavor": PLACEHOLDER_FLAVOR},
        "optimizer": {"name": "AdamW", **opt, "beta1": beta1, "beta2": beta2},
        **sections,
    }
    out = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        out.append("")
    usage = f"NGPU={par.world_size} CONFIG_FILE=this.toml ./run_train.sh (torchtitan <= 0.2)"
    header = comment_header("torchtitan (<= 0.2) JobConfig TOML exported by cotune", usage, lost)
    return Exported(text=header + "\n" + "\n".join(out), unexpressed=lost, suffix=".toml")
