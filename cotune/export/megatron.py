"""``megatron``: Megatron-LM command-line arguments (``pretrain_gpt.py``), one per line.

Megatron's data-parallel size is what the world size leaves after tp * pp, its
``--micro-batch-size`` is one pipeline micro-batch, and its micro-batch count per step
is global / (micro * dp): so with pipeline parallelism the trial's micro batch splits
into pp_microbatches of them, the same sequences per step. fsdp > 1 maps to
Megatron-FSDP with full sharding (parameters, gradients, optimizer state).

The model flags (megatron/training/arguments.py, _add_network_size_args and
_add_training_args): the shape of every workload (layers, width, heads, grouped-query
groups, MLP width); GPT-2's architecture for the built-in ``gpt`` and ``hf:gpt2``, which are
Megatron's GPT defaults (learned positions, LayerNorm, GELU whose fused bias-GELU kernel
computes GPT-2's tanh form, biases, tied embeddings); Llama's for ``hf:llama`` (SwiGLU,
RMSNorm, RoPE, no biases) from its config. A masked-LM workload is ``pretrain_bert.py``'s
job: MLM only (no sentence-order head), and what Megatron's BERT does differently is listed.
"""

from __future__ import annotations

from cotune.config import TrialConfig, WorkloadConfig
from cotune.export.architecture import hf_type, rope_scaling, setting, shape
from cotune.export.base import (
    ADAM_EPS,
    MASK_RATE,
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


def _shape_flags(w: WorkloadConfig) -> list[str]:
    # The MLP width always: with --swiglu Megatron's default is not 4h but about 8h/3.
    flags = [_flag("num-layers", w.n_layer), _flag("hidden-size", w.n_embd), _flag("num-attention-heads", w.n_head),
             _flag("ffn-hidden-size", w.ffn_width)]
    if w.kv_heads != w.n_head:
        flags += [_flag("group-query-attention"), _flag("num-query-groups", w.kv_heads)]
    head_dim = w.config.get("head_dim")
    if head_dim is not None and head_dim != w.n_embd // w.n_head:
        flags.append(_flag("kv-channels", head_dim))
    return flags


def _llama_flags(w: WorkloadConfig) -> tuple[list[str], list[str]]:
    """Llama's architecture from its config: SwiGLU, RMSNorm, RoPE, biases, tying."""
    flags, lost = [_flag("normalization", "RMSNorm"), _flag("norm-epsilon", float(setting(w, "rms_norm_eps"))),
                   _flag("position-embedding-type", "rope")], []
    if setting(w, "hidden_act") == "silu":
        flags.append(_flag("swiglu"))
    else:
        lost.append(knob("workload.config.hidden_act", setting(w, "hidden_act"), "Megatron's gated MLP is SwiGLU "
                         "(--swiglu) only; set the activation in a model spec of your own"))
    theta = setting(w, "rope_theta")
    if float(theta).is_integer():
        flags.append(_flag("rotary-base", int(theta)))  # an int flag in Megatron
    else:
        lost.append(knob("workload.config.rope_theta", theta, "--rotary-base takes whole numbers only"))
    scaling = rope_scaling(w)
    if scaling is not None:
        llama3 = scaling.get("rope_type", scaling.get("type")) == "llama3" and (
            scaling.get("low_freq_factor"), scaling.get("high_freq_factor"),
            scaling.get("original_max_position_embeddings")) == (1.0, 4.0, 8192)
        if llama3:
            flags += [_flag("use-rope-scaling"), _flag("rope-scaling-factor", float(scaling["factor"]))]
        else:
            lost.append(knob("workload.config.rope_scaling", scaling, "Megatron's --use-rope-scaling is Llama 3.1's "
                             "only (low_freq_factor 1, high_freq_factor 4, 8192 original positions)"))
    attention_bias, mlp_bias = bool(setting(w, "attention_bias")), bool(setting(w, "mlp_bias"))
    if not attention_bias:
        flags.append(_flag("disable-bias-linear"))
        if mlp_bias:
            lost.append(knob("workload.config.mlp_bias", True, "Megatron has biases on every linear layer or on q/k/v "
                             "only, not on the MLP alone"))
    elif not mlp_bias:
        flags += [_flag("disable-bias-linear"), _flag("add-qkv-bias")]
        lost.append(knob("workload.config.attention_bias", True, "Llama's attention bias is on q, k, v and o; "
                         "Megatron's --add-qkv-bias leaves o without one"))
    if not setting(w, "tie_word_embeddings"):
        flags.append(_flag("untie-embeddings-and-output-weights"))
    return flags, lost


def _gpt2_flags(w: WorkloadConfig) -> tuple[list[str], list[str]]:
    """GPT-2 from its config: Megatron's GPT defaults, with its epsilon and tying."""
    flags, lost = [], []
    eps = setting(w, "layer_norm_epsilon")
    if eps != 1e-5:
        flags.append(_flag("norm-epsilon", float(eps)))
    if setting(w, "activation_function") not in ("gelu_new", "gelu_pytorch_tanh"):
        lost.append(knob("workload.config.activation_function", setting(w, "activation_function"),
                         "Megatron's GPT runs the tanh GELU of GPT-2's gelu_new"))
    if not setting(w, "tie_word_embeddings"):
        flags.append(_flag("untie-embeddings-and-output-weights"))
    return flags, lost


def _model_flags(config: TrialConfig) -> tuple[list[str], list[str], str]:
    """Shape and architecture flags, what they cannot express, and the script that trains this objective."""
    w = config.workload
    kind = "gpt" if w.model == "gpt" else hf_type(w)
    flags = _shape_flags(w)
    positions = w.seq_len if kind == "gpt" else setting(w, "max_position_embeddings") or w.seq_len
    flags += [_flag("seq-length", w.seq_len), _flag("max-position-embeddings", max(positions, w.seq_len)),
              _flag("attention-dropout", 0.0), _flag("hidden-dropout", 0.0)]  # the trial trains without dropout
    if "initializer_range" in w.config:
        flags.append(_flag("init-method-std", float(w.config["initializer_range"])))
    lost: list[str] = []
    if w.objective == "masked_lm":
        flags += [_flag("bert-no-binary-head"), _flag("mask-prob", MASK_RATE)]  # masked LM alone, as the trial
        if kind == "bert":
            flags.append(_flag("norm-epsilon", float(setting(w, "layer_norm_eps"))))
            why = ("pretrain_bert.py trains it; Megatron's BERT normalises before each sublayer (Hugging Face's BERT "
                   "after each residual add) and, without the sentence-order head, has no token-type embedding")
        else:
            why = (f"pretrain_bert.py trains it as Megatron's BERT of this shape ({shape(w)}); set what {w.model}'s "
                   "config does differently in a model spec of your own")
        lost.append(knob("workload.model", w.model, why))
        return flags, lost, "pretrain_bert.py"
    if kind == "llama":
        more, lost = _llama_flags(w)
    elif kind == "gpt2":
        more, lost = _gpt2_flags(w)
    elif kind == "gpt":
        more = []  # Megatron's GPT defaults are the built-in GPT's architecture
    else:
        more = []
        lost.append(knob("workload.model", w.model, f"the flags give its shape only ({shape(w)}) on Megatron's "
                         "GPT-2-style defaults; set its normalization, activation, positions and biases from its config"))
    return flags + more, lost, "pretrain_gpt.py"


def _tokenizer(config: TrialConfig) -> tuple[list[str], list[str]]:
    tokenizer = config.workload.tokenizer
    if tokenizer == "bytes":
        return [], [knob("workload.tokenizer", "bytes", "cotune's byte tokenizer (256 end-of-text, 257 mask) has no "
                         "Megatron tokenizer type: preprocess the data (tools/preprocess_data.py) with one of your own")]
    if tokenizer.startswith("bpe:"):
        return [], [knob("workload.tokenizer", tokenizer, "cotune saved the BPE it trained in "
                         "~/.cache/cotune/data/<corpus>/tokenizer: pass --tokenizer-type HuggingFaceTokenizer "
                         "--tokenizer-model <that folder>, and preprocess the data with it")]
    return [_flag("tokenizer-type", "HuggingFaceTokenizer"), _flag("tokenizer-model", tokenizer)], []


@register("megatron")
def export_megatron(config: TrialConfig) -> Exported:
    """Parallel sizes, batch sizes, model shape, precision, AdamW, schedule, recompute, sharding."""
    b, par, opt, sw = config.batch, config.parallel, config.optimizer, config.software
    precision = config.precision.precision
    model_flags, model_lost, script = _model_flags(config)
    tokenizer_flags, tokenizer_lost = _tokenizer(config)
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
        *model_flags,
        *tokenizer_flags,
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

    lost = (launcher_note(config, f"torchrun --nproc-per-node {par.world_size} {script}") + kernel_notes(config)
            + model_lost + tokenizer_lost)
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
        f"torchrun --nproc-per-node {par.world_size} {script} $(grep -v '^#' this.args) --data-path ..."
        f"{'' if tokenizer_flags else ' --tokenizer-type ...'} (one argument per line)",
        lost,
    )
    return Exported(text=header + "\n".join(args) + "\n", unexpressed=lost, suffix=".args")
