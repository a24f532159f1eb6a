"""Hugging Face ``transformers`` architectures as workloads: ``hf:<model_type>`` or ``hf:/local/dir``.

The model is the architecture's own ``AutoModelForCausalLM`` (decoders) or
``AutoModelForMaskedLM`` (the BERT family) built with ``from_config`` (random init), or
``from_pretrained`` for a local checkpoint; nothing is ever downloaded. What cotune lays
out is read off the model itself:

- layers: the ``nn.ModuleList`` whose layers are the model's ``_no_split_modules`` class;
- tensor parallel: the config's own ``base_model_tp_plan`` (Llama, Qwen2, Mistral, ...)
  restricted to one layer; GPT-2 and BERT ship none, so cotune has theirs;
- pipeline stages: a module per family that runs layers [a, b) the way the family's own
  forward does (tests/test_hf.py checks the stages chained equal the model's own logits).

The per-family plans and stages are in :mod:`cotune.trial.hf_layout`.

:func:`resolve_config` turns a space's ``workload.config`` into every field cotune passes to
the config (vocabulary, positions, dropout 0, special-token ids), so the study records the
exact architecture that ran; bad input is a :class:`~cotune.errors.UserError`.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cotune.config import WorkloadConfig
from cotune.errors import UserError
from cotune.trial.hf_layout import (
    DECODER_FAMILIES,
    STAGED_FAMILIES,
    STAGES,
    sequence_plan,
    stage_cutter,
    stage_problem,
    tied_names,
    tp_plan,
)
from cotune.trial.workloads import Workload

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_EXAMPLES = ("llama", "gpt2", "qwen2", "mistral", "bert", "roberta")


# ---------------------------------------------------------------------------- where the model comes from


def model_source(model: str) -> tuple[str, str]:
    """``("type", model_type)`` or ``("dir", folder)`` for ``hf:...``; UserError when it is neither."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    name = model.removeprefix("hf:")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"workload.model {model!r}: the folder {path} has no config.json; give a folder saved "
                            "with save_pretrained (a config, optionally weights) or a model type such as hf:llama")
        return "dir", str(path.resolve())
    if name in CONFIG_MAPPING_NAMES:
        return "type", name
    if "/" in name and not name.startswith((".", "/", "~")):  # a hub id: only a copy already on disk will do
        cached = _hub_cache(name)
        if cached is not None:
            return "dir", cached
        raise UserError(
            f"workload.model {model!r} is not on this machine, and cotune downloads nothing while it runs; "
            f"fetch it first (`hf download {name} --local-dir models/{name.split('/')[-1]}`) and give "
            f"model: hf:models/{name.split('/')[-1]}"
        )
    if "/" in name or name.startswith((".", "~")):
        raise UserError(f"workload.model {model!r}: the folder {path} does not exist")
    close = difflib.get_close_matches(name, list(CONFIG_MAPPING_NAMES), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"workload.model {model!r} is not a transformers model type{hint}; valid types include "
                    f"{', '.join(_EXAMPLES)} (transformers' CONFIG_MAPPING), or give hf:/path/to/local/dir")


def _hub_cache(repo_id: str) -> str | None:
    """The folder of ``repo_id`` in the local Hugging Face cache, if it was downloaded before (no network)."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: either way, not on disk
        return None


def has_weights(folder: str) -> bool:
    return any((Path(folder) / f).is_file() for f in _WEIGHT_FILES)


def _base_config(source: tuple[str, str]) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    kind, name = source
    if kind == "dir":
        return AutoConfig.from_pretrained(name, local_files_only=True)
    return CONFIG_MAPPING[name]()


def objective_of(model_type: str) -> str:
    """masked_lm for the BERT family (a masked-LM head), causal_lm for decoders; UserError for neither."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked_lm"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal_lm"
    raise UserError(f"workload.model hf:{model_type}: transformers has neither a causal-LM nor a masked-LM head for "
                    f"{model_type!r}; cotune trains language models such as {', '.join(_EXAMPLES)}")


# ---------------------------------------------------------------------------- the config fields


def resolve_config(
    model: str, fields: dict[str, Any], *, seq_len: int, vocab_size: int, eot_id: int | None, pad_id: int | None
) -> tuple[dict[str, Any], str]:
    """Every config field cotune passes for ``model``, and its objective.

    The space's ``fields`` first (each must be a field of the architecture's config), then:
    ``vocab_size`` = the tokenizer's (a checkpoint keeps its own, which must cover the data),
    positions >= ``seq_len``, every dropout 0.0 (short tuning runs compare configs by their
    loss; dropout would make equal configs differ), bos/eos = the end-of-text token where the
    architecture has them, pad = the tokenizer's pad token (None: no embedding row is frozen
    as padding).
    """
    source = model_source(model)
    base = _base_config(source)
    model_type = base.model_type
    defaults = base.to_dict()
    known = set(defaults) | set(getattr(base, "attribute_map", {})) | set(inspect.signature(type(base)).parameters)
    for key in fields:
        if key not in known and not _consumed(source, key, fields[key]):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"workload.config.{key}: {model_type}'s config has no field {key!r}{hint}")
    canon = {alias: target for alias, target in getattr(base, "attribute_map", {}).items()}

    def given(name: str) -> bool:
        return name in fields or canon.get(name) in fields or any(canon.get(k) == name for k in fields)

    try:  # the architecture derives fields (Llama's num_key_value_heads = num_attention_heads when unset)
        built, problem = hf_config(source, fields), None
    except Exception as e:  # its own validation (transformers' strict config classes); said below
        built, problem = None, e

    def value(name: str) -> Any:
        if built is not None:
            return getattr(built, name, None)
        for key in (name, canon.get(name)):
            if key in fields:
                return fields[key]
        return getattr(base, name, None)

    hidden, heads, kv = value("hidden_size"), value("num_attention_heads"), value("num_key_value_heads")
    if built is None and not given("num_key_value_heads"):
        kv = None
    if isinstance(hidden, int) and isinstance(heads, int) and not given("head_dim") and hidden % heads:
        raise UserError(f"workload.config: num_attention_heads must divide hidden_size, but got "
                        f"hidden_size={hidden}, num_attention_heads={heads}")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise UserError(f"workload.config: num_key_value_heads must divide num_attention_heads, but got "
                        f"num_attention_heads={heads}, num_key_value_heads={kv}")
    if problem is not None:
        raise UserError(f"workload.config: {model_type} rejects these fields: {_first_line(problem)}")
    out = dict(fields)
    pretrained = source[0] == "dir" and has_weights(source[1])
    model_vocab = value("vocab_size")
    if pretrained or given("vocab_size"):
        if model_vocab < vocab_size:
            where = "the checkpoint's" if pretrained and not given("vocab_size") else "workload.config.vocab_size"
            raise UserError(f"{where} vocab_size >= the tokenizer's vocabulary must hold, but got "
                            f"vocab_size={model_vocab}, tokenizer vocabulary={vocab_size}")
    else:
        out["vocab_size"] = vocab_size
    positions = value("max_position_embeddings")
    if isinstance(positions, int) and positions < seq_len:
        if given("max_position_embeddings") or pretrained:
            raise UserError(f"max_position_embeddings >= seq_len must hold, but got "
                            f"max_position_embeddings={positions}, seq_len={seq_len}")
        out[canon.get("max_position_embeddings", "max_position_embeddings")] = seq_len
    for key, default in defaults.items():
        if ("dropout" in key or "pdrop" in key) and isinstance(default, float) and default > 0 and not given(key):
            out[key] = 0.0
    for key, token in (("bos_token_id", eot_id), ("eos_token_id", eot_id)):
        if isinstance(defaults.get(key), int) and not given(key):  # only where the architecture has one
            out[key] = token
    if "pad_token_id" in defaults and not given("pad_token_id"):
        out["pad_token_id"] = pad_id
    try:
        hf_config(source, out)
    except Exception as e:  # what cotune set conflicts with the space's fields (the architecture's own check)
        raise UserError(f"workload.config: {model_type} rejects these fields: {_first_line(e)}") from None
    return out, objective_of(model_type)


def _consumed(source: tuple[str, str], key: str, value: Any) -> bool:
    """Whether the config class takes ``key`` into another field (transformers 5 folds ``rope_theta`` into
    ``rope_parameters``); an unknown key is kept as a stray attribute instead, so it shows in ``to_dict``."""
    try:
        return key not in hf_config(source, {key: value}).to_dict()
    except Exception:  # the value is wrong for a field it knows: let the full build say so
        return True


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]


def hf_config(source: tuple[str, str], fields: dict[str, Any]) -> Any:
    """The transformers config of ``source`` with ``fields`` set."""
    from transformers import AutoConfig

    kind, name = source
    if kind == "dir":
        return AutoConfig.from_pretrained(name, local_files_only=True, **fields)
    return AutoConfig.for_model(name, **fields)


# ---------------------------------------------------------------------------- building the workload


def build_hf(cfg: WorkloadConfig, weights: bool = True) -> Workload:
    """The ``hf:`` model of ``cfg`` (its ``config`` as :func:`resolve_config` made it), as a Workload.

    A local checkpoint's weights are loaded unless ``weights`` is False (the same architecture, random init).
    """
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    source = model_source(cfg.model)
    hf_cfg = hf_config(source, cfg.config)
    auto = AutoModelForMaskedLM if cfg.objective == "masked_lm" else AutoModelForCausalLM
    if weights and source[0] == "dir" and has_weights(source[1]):
        model = auto.from_pretrained(source[1], config=hf_cfg, local_files_only=True, dtype=torch.float32)
    else:
        model = auto.from_config(hf_cfg, dtype=torch.float32)  # fp32 master weights; autocast does the rest
    return workload_of(model, cfg.objective)


class HFLogits(nn.Module):
    """Token ids (B, T) -> logits (B, T, V) through the Hugging Face model's own forward."""

    def __init__(self, model: nn.Module, causal: bool) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if causal else {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x, **self.kwargs).logits


def workload_of(model: nn.Module, objective: str) -> Workload:
    """The Workload of a built transformers model: layers, TP plan, stages and tied matrices read off it."""
    family = model.config.model_type
    layers = _find_layers(model)
    wrapped = HFLogits(model, causal=objective == "causal_lm")
    plan, prepare, tp_reason = tp_plan(model, layers, family)
    extra: dict[str, Any] = {"family": family, "architecture": type(model).__name__,
                             "layer_class": _layer_class(model, layers)}
    if tp_reason:
        extra["tp_reason"] = tp_reason
    stage = tied = None
    if family in STAGED_FAMILIES and layers is not None:
        reason = stage_problem(model, family)
        if reason:
            extra["pp_reason"] = reason
        else:
            stage = stage_cutter(STAGES[family])
            tied = tied_names(model, family)
    else:
        extra["pp_reason"] = (f"pipeline stages of hf:{family} are not run yet: cotune cuts stages for "
                              f"{', '.join(STAGED_FAMILIES)}, whose forward it mirrors and tests")
    sp_plan = sequence_plan(model, family)
    if sp_plan is None:
        extra["sp_reason"] = (f"sequence parallel of hf:{family} is not run yet: cotune knows where the norms, "
                              f"attention and MLP of {', '.join((*DECODER_FAMILIES, 'gpt2'))} layers are")
    return Workload(
        model=wrapped, layers=f"model.{layers}" if layers else None, tp_plan=plan, objective=objective,
        stage=stage, stage_layers="layers", tied=tied, tp_prepare=prepare, sequence_plan=sp_plan,
        kernels=("cross_entropy",) if objective == "causal_lm" else (), n_params=_flops_params(model), extra=extra,
    )


def _find_layers(model: nn.Module) -> str | None:
    """Path of the ModuleList whose entries are the model's ``_no_split_modules`` (its transformer layers)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(type(m).__name__ in names for m in module):
            return path
    return None


def _layer_class(model: nn.Module, layers: str | None) -> str | None:
    return type(model.get_submodule(layers)[0]).__name__ if layers else None


def _flops_params(model: nn.Module) -> int:
    """Parameters for 6N FLOPs per token: tied matrices once, position embeddings left out (as nanoGPT)."""
    seen = {id(p): p for p in model.parameters()}
    n = sum(p.numel() for p in seen.values())
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in ("wpe", "position_embeddings",
                                                                            "token_type_embeddings"):
            n -= module.weight.numel()
    return n


def shape_of(config: Any) -> dict[str, int | None]:
    """The shape fields of WorkloadConfig read off a transformers config (attribute_map resolves GPT-2's names)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None)
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
    return {"n_layer": config.num_hidden_layers, "n_embd": hidden, "n_head": heads,
            "n_kv_head": kv if kv is not None and kv != heads else None,
            "ffn_hidden": ffn if ffn is not None and ffn != 4 * hidden else None}
