"""What every exporter knows about the workload's model: where it comes from, the settings its
config holds, and the one line of Python that builds it.

An ``hf:`` workload's ``config`` holds every field cotune passed to the architecture's config
(``cotune.trial.hf.resolve_config``), not the fields it left at their defaults. Exporters never
import transformers, so the few class defaults they read are written here; tests/test_export.py
checks them against the installed transformers. The built-in ``gpt`` is GPT-2's network exactly
(pre-LayerNorm blocks, learned positions, tanh-GELU MLP of 4x width, biases, tied embeddings,
GPT-2's init); only its q/k/v are three matrices where GPT-2 fuses one, so :func:`gpt2_twin`
names the GPT-2 config that builds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cotune.config import TrialConfig, WorkloadConfig
from cotune.export.base import knob

# transformers 5's defaults of the fields exporters read, per model type (LlamaConfig, GPT2Config,
# BertConfig). rope_theta lives in config.rope_parameters there; it is listed by its own name.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048, "initializer_range": 0.02},
    "gpt2": {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
             "n_positions": 1024, "initializer_range": 0.02},
    "bert": {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "tie_word_embeddings": True,
             "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02},
}
# Config files that make a folder a checkpoint (cotune.trial.hf loads its weights) rather than a config only.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_source(w: WorkloadConfig) -> tuple[str, str] | None:
    """``("type", "llama")`` for ``hf:llama``, ``("path", folder or hub id)`` for ``hf:/dir``; None for others."""
    if not w.model.startswith("hf:"):
        return None
    name = w.model.removeprefix("hf:")
    if "/" in name or name.startswith((".", "~")):
        return "path", name
    return "type", name


def hf_type(w: WorkloadConfig) -> str | None:
    """The model type of ``hf:<model_type>`` (not of a local folder, whose config.json an exporter does not read)."""
    source = hf_source(w)
    return source[1] if source and source[0] == "type" else None


def setting(w: WorkloadConfig, key: str) -> Any:
    """``key`` as the trained model had it: the workload's config, else its type's default (None if unknown)."""
    if key in w.config:
        return w.config[key]
    if key == "max_position_embeddings" and "n_positions" in w.config:  # GPT-2's name for it
        return w.config["n_positions"]
    if key == "rope_theta" and isinstance(w.config.get("rope_parameters"), dict) and "rope_theta" in w.config[
            "rope_parameters"]:
        return w.config["rope_parameters"]["rope_theta"]
    defaults = HF_DEFAULTS.get(hf_type(w) or "", {})
    if key == "max_position_embeddings" and "n_positions" in defaults:
        return defaults["n_positions"]
    return defaults.get(key)


def rope_scaling(w: WorkloadConfig) -> dict[str, Any] | None:
    """The RoPE frequency scaling the config sets (``rope_scaling``, or transformers 5's ``rope_parameters``), if any."""
    scaling = w.config.get("rope_scaling")
    if scaling is None and isinstance(w.config.get("rope_parameters"), dict):
        scaling = {k: v for k, v in w.config["rope_parameters"].items() if k != "rope_theta"}
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return dict(scaling)


def has_weights(folder: str) -> bool:
    """Whether a local model folder holds weights, which the trial then loaded (read off the disk at export)."""
    path = Path(folder).expanduser()
    return any((path / name).is_file() for name in WEIGHT_FILES)


def gpt2_twin(w: WorkloadConfig) -> dict[str, Any]:
    """The GPT2Config fields that build cotune's built-in GPT: its shape, positions = seq_len, no dropout."""
    return {"n_layer": w.n_layer, "n_embd": w.n_embd, "n_head": w.n_head, "n_positions": w.seq_len,
            "vocab_size": w.vocab_size, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


def auto_class(w: WorkloadConfig) -> str:
    return "AutoModelForMaskedLM" if w.objective == "masked_lm" else "AutoModelForCausalLM"


def build_code(w: WorkloadConfig) -> str:
    """One Python expression (transformers' names) that builds the model the trial trained."""
    source = hf_source(w)
    if w.model == "gpt":
        return f"GPT2LMHeadModel(GPT2Config(**{gpt2_twin(w)!r}))"
    if source is None:  # package.module:function gets the study's WorkloadConfig, as in `cotune trial`
        module, _, function = w.model.partition(":")
        return f"{module}.{function}(TrialConfig.load('config.json').workload)"
    kind, name = source
    auto = auto_class(w)
    if kind == "type":
        return f"{auto}.from_config(AutoConfig.for_model({name!r}, **{w.config!r}))"
    config = f"AutoConfig.from_pretrained({name!r}, **{w.config!r})"
    if Path(name).expanduser().is_dir() and not has_weights(name):
        return f"{auto}.from_config({config})"
    return f"{auto}.from_pretrained({name!r}, config={config})"


def in_code(config: TrialConfig, trainer: str, where: str) -> str:
    """The unexpressed line of a trainer that takes the model in code: what to build, and where."""
    w = config.workload
    if w.model == "gpt":
        built = " (cotune's built-in GPT is this GPT-2 network)"
    elif hf_source(w) is None:
        built = " (config.json: `cotune export --format json`; the function returns a Workload or the module)"
    else:
        built = ""
    return knob("workload.model", w.model, f"{trainer} takes the model in code; build `{build_code(w)}`{built} "
                f"{where}")


def shape(w: WorkloadConfig) -> str:
    """The shape in words: ``16 layers, 2048 wide, 32 heads (8 key/value), MLP 8192``."""
    kv = f" ({w.kv_heads} key/value)" if w.kv_heads != w.n_head else ""
    return f"{w.n_layer} layers, {w.n_embd} wide, {w.n_head} heads{kv}, MLP {w.ffn_width}"
