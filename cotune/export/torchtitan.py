"""``torchtitan`` and ``torchtitan-toml``: torchtitan's training settings.

Since torchtitan 0.3 a run is ``--module M --config C`` (a config_registry function)
followed by ``--section.key value`` overrides parsed by ``ConfigManager.parse_args``,
which rejects unknown keys. ``torchtitan`` writes those arguments as a file, one per
line; ``torchtitan-toml`` writes the JobConfig TOML that releases up to 0.2 read with
``--job.config_file``. Both keep cotune's names: dp is the replicate degree, fsdp
the shard degree, as torchtitan's ParallelDims has them.

The model: torchtitan builds its own models from fixed presets (flavors), so an
``hf:llama`` workload whose shape is a llama3 flavor's runs as that flavor (0.3: the
config_registry function that builds it; 0.2: ``[model] flavor``), and whatever the flavor
does differently (vocabulary, RoPE scaling, norm epsilon) is listed. Any other model has no
torchtitan counterpart: llama3's debugmodel stands in and the line says so.
"""

from __future__ import annotations

from cotune.config import TrialConfig, WorkloadConfig
from cotune.export.architecture import rope_scaling, setting, shape
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
# A torchtitan model stands in for a workload that is none of its flavors.
PLACEHOLDER_MODULE, PLACEHOLDER_CONFIG, PLACEHOLDER_FLAVOR = "llama3", "llama3_debugmodel", "debugmodel"
# torchtitan's llama3 flavors (torchtitan/models/llama3/__init__.py, 0.3 and 0.2): dim, layers, heads,
# key/value heads, SwiGLU width, tied embeddings, vocabulary. Every one has RoPE theta 500000 with
# Llama 3.1's frequency scaling and RMSNorm eps 1e-5, no biases. tests/test_export.py checks this table.
LLAMA3_FLAVORS: dict[str, tuple[int, int, int, int, int, bool, int]] = {
    "debugmodel": (256, 6, 16, 16, 768, False, 2048),
    "1B": (2048, 16, 32, 8, 8192, True, 128256),
    "3B": (3072, 28, 24, 8, 8192, True, 128256),
    "8B": (4096, 32, 32, 8, 14336, False, 128256),
    "70B": (8192, 80, 64, 8, 28672, False, 128256),
    "405B": (16384, 126, 128, 8, 53248, False, 128256),
}
# 0.3 selects a model by a config_registry function (torchtitan/models/llama3/config_registry.py); not every
# flavor has one. 0.2's llama3_args has no weight tying, so no 1B or 3B.
CONFIG_FUNCTIONS = {"debugmodel": "llama3_debugmodel", "8B": "llama3_8b", "70B": "llama3_70b", "405B": "llama3_405b"}
LEGACY_FLAVORS = ("debugmodel", "8B", "70B", "405B")
LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_flavor(w: WorkloadConfig) -> tuple[str | None, str]:
    """The llama3 flavor with the workload's architecture and shape, or None and why there is none."""
    if w.model != "hf:llama":
        return None, (f"{w.model} ({shape(w)}) is not a torchtitan model (torchtitan ships llama3, qwen3, "
                      "deepseek_v3 and a few others)")
    problems = [f"{key}={setting(w, key)}" for key, want in (("hidden_act", "silu"), ("attention_bias", False),
                                                              ("mlp_bias", False)) if setting(w, key) != want]
    if w.config.get("head_dim") not in (None, w.n_embd // w.n_head):
        problems.append(f"head_dim={w.config['head_dim']}")
    if problems:
        return None, f"torchtitan's llama3 has SwiGLU, no biases and head_dim = dim / heads, but this has {', '.join(problems)}"
    key = (w.n_embd, w.n_layer, w.n_head, w.kv_heads, w.ffn_width, bool(setting(w, "tie_word_embeddings")))
    for name, flavor in LLAMA3_FLAVORS.items():
        if flavor[:6] == key:
            return name, ""
    tied = ", tied embeddings" if key[5] else ""
    return None, (f"no llama3 flavor has its shape ({shape(w)}{tied}); add one to llama3_configs in "
                  "torchtitan/models/llama3/__init__.py")


def _flavor_differences(w: WorkloadConfig, flavor: str) -> list[str]:
    """What the flavor fixes differently from the trial's model of the same shape."""
    vocab = LLAMA3_FLAVORS[flavor][6]
    out = []
    if w.vocab_size != vocab:
        out.append(f"vocabulary {vocab} (the trial's: {w.vocab_size}, from its tokenizer)")
    theta = setting(w, "rope_theta")
    if theta != 500000:
        out.append(f"RoPE theta 500000 (the trial's: {theta:g})")
    scaling = rope_scaling(w)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) != "llama3" or any(
            scaling.get(k) != v for k, v in LLAMA31_ROPE.items()):
        out.append(f"Llama 3.1's RoPE frequency scaling (factor 8; the trial's: {scaling or 'none'})")
    eps = setting(w, "rms_norm_eps")
    if eps != 1e-5:
        out.append(f"RMSNorm eps 1e-05 (the trial's: {eps:g})")
    return out


def _model(config: TrialConfig, legacy: bool) -> tuple[str, list[str]]:
    """The 0.3 config function (or the 0.2 flavor) to run, and what it does not express of the model."""
    w = config.workload
    flavor, why = llama3_flavor(w)
    placeholder = PLACEHOLDER_FLAVOR if legacy else PLACEHOLDER_CONFIG
    stands_in = f"{PLACEHOLDER_MODULE}/{placeholder} stands in, replace it with your own"
    if flavor is None:
        return placeholder, [knob("workload.model", w.model, f"{why}; {stands_in}")]
    differs = _flavor_differences(w, flavor)
    edit = f"; it differs in {'; '.join(differs)}: edit the flavor to match" if differs else ""
    if legacy and flavor not in LEGACY_FLAVORS:
        return placeholder, [knob("workload.model", w.model, f"has the shape of llama3 flavor {flavor}, which torchtitan "
                                  f"0.2 does not have (its llama3 flavors: {', '.join(LEGACY_FLAVORS)}; none ties "
                                  f"embeddings){edit}; {stands_in}")]
    if not legacy and flavor not in CONFIG_FUNCTIONS:
        return placeholder, [knob("workload.model", w.model, f"has the shape of llama3 flavor {flavor}, which no "
                                  "torchtitan 0.3 config_registry function builds: add one (llama3_8b's, with "
                                  f"model_spec=model_registry('{flavor}')) and pass it as --config{edit}; "
                                  f"{stands_in}")]
    chosen = flavor if legacy else CONFIG_FUNCTIONS[flavor]
    lost = [knob("workload.model", w.model, f"runs as torchtitan's llama3 flavor {flavor}, the same shape{edit}")] \
        if differs else []
    return chosen, lost


def _inputs(config: TrialConfig) -> tuple[str | None, list[str]]:
    """The tokenizer folder for hf_assets_path (None: cotune's own tokenizer), and lines for what is not expressed."""
    w = config.workload
    lost = [knob("workload.data", w.data, "torchtitan reads the datasets registered in DATASETS "
                 "(torchtitan/hf_datasets/text_datasets.py): register yours there and name it as the dataset")]
    if w.tokenizer == "bytes":
        lost.append(knob("workload.tokenizer", "bytes", "torchtitan loads a saved Hugging Face tokenizer from "
                         "hf_assets_path; cotune's byte tokenizer has no saved form"))
        return None, lost
    if w.tokenizer.startswith("bpe:"):
        lost.append(knob("workload.tokenizer", w.tokenizer, "torchtitan loads a saved Hugging Face tokenizer from "
                         "hf_assets_path; cotune saved the BPE it trained in ~/.cache/cotune/data/<corpus>/tokenizer: "
                         "name that folder"))
        return None, lost
    return w.tokenizer, lost


def _settings(config: TrialConfig) -> tuple[dict[str, dict], list[str]]:
    """The values both layouts share, by section, and what neither can express."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    w = config.workload
    precision = config.precision.precision
    lost = launcher_note(config, f"NGPU={par.world_size} ./run_train.sh, or torchrun --nproc-per-node "
                                 f"{par.world_size} -m torchtitan.train") + kernel_notes(config)
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
    config_function, model_lost = _model(config, legacy=False)
    tokenizer, input_lost = _inputs(config)
    lost += model_lost + input_lost
    sections["parallelism"]["enable_sequence_parallel"] = par.sequence_parallel  # torchtitan's default is on
    # The registry's configs set a stable phase (decay_ratio 0.8); the trial decays right after warm-up.
    sections["lr_scheduler"]["decay_ratio"] = None
    if par.pp > 1:
        sections["training"]["disable_cuda_graphs"] = True  # 0.3 refuses CUDA graphs with pipeline parallelism
    lines = [f"--module {PLACEHOLDER_MODULE}", f"--config {config_function}"]
    if tokenizer is not None:
        lines.append(f"--hf_assets_path {tokenizer}")  # where torchtitan loads the tokenizer from
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
    flavor, model_lost = _model(config, legacy=True)
    tokenizer, input_lost = _inputs(config)
    lost += model_lost + input_lost
    if par.tp > 1 and not par.sequence_parallel:
        lost.append(knob("parallel.sequence_parallel", False, "torchtitan up to 0.2 always uses sequence "
                         "parallelism with tensor parallelism"))
    opt = sections.pop("optimizer")
    beta1, beta2 = opt.pop("betas")
    sections = {
        "job": {"description": "cotune export"},
        "model": {"name": PLACEHOLDER_MODULE, "flavor": flavor,
                  **({"hf_assets_path": tokenizer} if tokenizer is not None else {})},
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
