"""``hf``: Hugging Face ``TrainingArguments`` as JSON, with the model and data named the way
transformers' own example scripts take them.

One flat JSON file, as ``examples/pytorch/language-modeling/run_clm.py`` (causal LM) and
``run_mlm.py`` (masked LM) read it: ``python run_clm.py this.json`` parses it with
``HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))``, which
rejects unknown keys. Besides TrainingArguments' fields it holds:

- ``model_type`` + ``config_overrides``: a model from scratch, as the trial built it. The
  script makes ``CONFIG_MAPPING[model_type]()`` and calls ``update_from_string("k=v,...")``
  on it, which replaces only int, float, bool and str values already on the config; so every
  field cotune set goes in except those it cannot carry (listed), and a field the config
  class derives in ``__init__`` from others (Llama's head_dim) is written out. The built-in
  ``gpt`` goes in as ``gpt2``: the same network (``cotune.export.architecture``).
- ``config_name`` (a local config: fresh weights) or ``model_name_or_path`` (a local
  checkpoint, whose weights the trial loaded). The scripts take no config_overrides with
  either, so the fields cotune set on top are listed.
- ``tokenizer_name``, ``train_file``, ``block_size`` (run_clm) or ``max_seq_length`` and
  ``mlm_probability`` (run_mlm), ``do_train``.

transformers 5 dropped ``warmup_ratio``: a float ``warmup_steps`` below 1 is the ratio now,
and ``activation_checkpointing`` replaced ``gradient_checkpointing`` (kept as a deprecated
alias until v6). TrainingArguments alone still loads it:
``HfArgumentParser(TrainingArguments).parse_json_file(path, allow_extra_keys=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath
from typing import Any

from cotune.config import TrialConfig, WorkloadConfig
from cotune.export.architecture import build_code, gpt2_twin, has_weights, hf_source
from cotune.export.base import (
    ADAM_EPS,
    MASK_RATE,
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
SCRIPTS = {"causal_lm": "run_clm.py", "masked_lm": "run_mlm.py"}  # transformers' examples/pytorch/language-modeling
# The model types whose config classes the rules below were checked on (tests/test_export.py, transformers 5).
CHECKED_TYPES = ("llama", "gpt2", "bert")
# Fields whose default is None, which update_from_string cannot replace (it converts to the old value's type).
NONE_BY_DEFAULT: dict[str, frozenset[str]] = {
    "llama": frozenset({"pad_token_id"}),
    "gpt2": frozenset({"n_inner", "pad_token_id", "summary_activation"}),
    "bert": frozenset({"bos_token_id", "eos_token_id", "classifier_dropout"}),
}
# transformers 5 keeps RoPE settings in config.rope_parameters (a dict), out of config_overrides' reach.
ROPE_FIELDS = ("rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor")
_TEXT_SUFFIXES = (".txt", ".json", ".csv")  # what the scripts accept as train_file (datasets' text/json/csv)


def _derived(model_type: str, w: WorkloadConfig) -> dict[str, Any]:
    """Fields the config class computes in ``__init__`` from others: set after it, they keep the default's."""
    if model_type == "llama" and "head_dim" not in w.config:
        return {"head_dim": w.n_embd // w.n_head}  # LlamaConfig: head_dim = hidden_size // num_attention_heads
    return {}


def _why_not(model_type: str, key: str, value: Any) -> str | None:
    """Why config_overrides cannot carry ``key=value`` for ``model_type``; None if it can, '' if nothing is lost."""
    if key in ROPE_FIELDS:
        hint = (f"config.rope_parameters['rope_theta'] = {value!r}" if key == "rope_theta"
                else "config.rope_parameters to this dict" if key == "rope_parameters" else "config.rope_parameters")
        return (f"transformers 5 keeps RoPE settings in config.rope_parameters, a dict config_overrides cannot "
                f"reach; set {hint} in the script before the model is built")
    none_default = key in NONE_BY_DEFAULT.get(model_type, ())
    if value is None:
        return "" if none_default else "config_overrides cannot set None; set it on the config in the script"
    if not isinstance(value, (bool, int, float, str)):
        return "config_overrides holds int, float, bool and str values only; set it on the config in the script"
    if isinstance(value, str) and ("," in value or "=" in value):
        return "config_overrides splits at ',' and '=', which this value holds; set it on the config in the script"
    if none_default:
        return (f"{model_type}'s default is None, which config_overrides cannot replace; set config.{key} = {value!r} "
                "in the script")
    return None


def _as_string(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def config_overrides(model_type: str, fields: dict[str, Any], w: WorkloadConfig) -> tuple[str, list[str]]:
    """The ``config_overrides`` string for ``fields`` and one line per field it cannot carry."""
    parts, lost = [], []
    for key, value in {**fields, **_derived(model_type, w)}.items():
        why = _why_not(model_type, key, value)
        if why is None:
            parts.append(f"{key}={_as_string(value)}")
        elif why:
            lost.append(knob(f"workload.config.{key}", value, why))
    if model_type not in CHECKED_TYPES:
        lost.append(knob("workload.model", w.model, f"config_overrides is applied to {model_type}'s default config "
                         "after it is built, so a field whose default is None stays None and one its __init__ derives "
                         f"from others keeps the default's value; cotune checked this for {', '.join(CHECKED_TYPES)} "
                         f"only: compare the config the script logs with `{build_code(w)}`"))
    return ",".join(parts), lost


def _model_keys(config: TrialConfig) -> tuple[dict[str, Any], list[str]]:
    """ModelArguments and DataTrainingArguments keys of the scripts, and what they cannot take."""
    w = config.workload
    script = SCRIPTS[w.objective]
    keys: dict[str, Any] = {}
    lost: list[str] = []
    source = hf_source(w)
    if w.model == "gpt":
        keys["model_type"] = "gpt2"
        keys["config_overrides"], lost = config_overrides("gpt2", gpt2_twin(w), w)
    elif source is None:
        lost.append(knob("workload.model", w.model, f"{script} builds transformers models only; write a script that "
                         f"passes `{build_code(w)}` to Trainer(model=...)"))
    elif source[0] == "type":
        keys["model_type"] = source[1]
        keys["config_overrides"], lost = config_overrides(source[1], w.config, w)
    else:
        folder = source[1]
        # A folder on this machine without weights is a config: the trial built it with fresh weights.
        fresh = Path(folder).expanduser().is_dir() and not has_weights(folder)
        keys["config_name" if fresh else "model_name_or_path"] = folder
        if w.config:
            lost.append(knob("workload.config", w.config, f"{script} takes no config_overrides with "
                             f"{'config_name' if fresh else 'model_name_or_path'}; save "
                             f"AutoConfig.from_pretrained({folder!r}, **config) with save_pretrained and pass that "
                             "folder as config_name"))
    if w.objective == "masked_lm":
        keys["max_seq_length"] = w.seq_len
        keys["mlm_probability"] = MASK_RATE
    else:
        keys["block_size"] = w.seq_len
    if w.tokenizer == "bytes" or w.tokenizer.startswith("bpe:"):
        lost.append(_tokenizer_line(w.tokenizer, f"{script} loads a saved tokenizer (tokenizer_name)"))
    else:
        keys["tokenizer_name"] = w.tokenizer
    suffix = PurePath(w.data).suffix.lower()
    if suffix in _TEXT_SUFFIXES and not w.data.startswith("builtin:"):
        keys["train_file"] = w.data
        if suffix != ".txt" and w.data_field != "text":
            lost.append(knob("workload.data_field", w.data_field, f"{script} reads the column 'text', else the first"))
    else:
        lost.append(knob("workload.data", w.data, f"{script} reads a .txt, .json (JSON Lines too) or .csv train_file, "
                         f"or a dataset_name; {_data_hint(w.data, suffix)}"))
    return keys, lost


def _data_hint(data: str, suffix: str) -> str:
    if data.startswith("builtin:"):
        return "cotune's built-in corpus is no file, so give one of your own"
    if suffix == ".jsonl":
        return "JSON Lines it reads under the .json extension only, so link or rename the file"
    return "convert the data to one of these, or give a dataset_name"


def _tokenizer_line(tokenizer: str, needs: str) -> str:
    if tokenizer == "bytes":
        why = (f"{needs}; cotune's byte tokenizer (ids 0-255 the bytes, 256 end-of-text, 257 mask) has no saved "
               "form, so train with a tokenizer of your own (or pick bpe:<N> or a folder in the space)")
    else:
        why = (f"{needs}; cotune saved the BPE it trained with the prepared data, in "
               "~/.cache/cotune/data/<corpus>/tokenizer (AutoTokenizer loads it): name that folder")
    return knob("workload.tokenizer", tokenizer, why)


@register("hf")
def export_hf(config: TrialConfig) -> Exported:
    """TrainingArguments for batch, precision, AdamW, schedule and sharding, plus run_clm/run_mlm's model and data."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    precision = config.precision.precision
    model_keys, lost = _model_keys(config)
    args: dict = {
        **model_keys,
        "do_train": True,  # the example scripts train only when asked
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

    lost = launcher_note(config, f"torchrun --nproc-per-node {par.world_size} "
                                 f"{SCRIPTS[config.workload.objective]} this.json") + kernel_notes(config) + lost
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
