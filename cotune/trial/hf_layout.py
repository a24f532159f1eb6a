"""How a Hugging Face family is laid out: its tensor-parallel and sequence-parallel plans, and its pipeline stages.

transformers ships a tensor-parallel plan per architecture (``base_model_tp_plan``) for
most decoders; GPT-2 and BERT have none, so theirs are here. A pipeline stage runs layers
[a, b) the way the family's own forward does; tests/test_hf.py checks the stages chained
equal the model's own logits, so only the families listed here are cut.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from cotune.trial.workloads import SequencePlan

# Families whose pipeline stage module below is checked against the model's own forward.
DECODER_FAMILIES = ("llama", "mistral", "qwen2")  # embed_tokens, rotary_emb, layers, norm; lm_head
STAGED_FAMILIES = (*DECODER_FAMILIES, "gpt2", "bert")
# Tensor-parallel plans, one layer's submodules, for families whose config has no base_model_tp_plan.
# GPT-2's fused q/k/v (c_attn) is split per head by _gpt2_tp_prepare before its plan applies.
TP_PLANS: dict[str, dict[str, str]] = {
    "gpt2": {"attn.c_attn": "colwise", "attn.c_proj": "rowwise", "mlp.c_fc": "colwise", "mlp.c_proj": "rowwise"},
    "bert": {"attention.self.query": "colwise", "attention.self.key": "colwise", "attention.self.value": "colwise",
             "attention.output.dense": "rowwise", "intermediate.dense": "colwise", "output.dense": "rowwise"},
}


def tp_plan(model: nn.Module, layers: str | None, family: str) -> tuple[dict[str, str] | None, Any, str]:
    """One layer's plan from the config's base_model_tp_plan (or cotune's for GPT-2 / BERT), and why none."""
    if layers is None:
        return None, None, ""
    own = getattr(model.config, "base_model_tp_plan", None)
    if own:
        prefix = layers.removeprefix(model.base_model_prefix + ".") + ".*."  # "layers.*." under the base model
        plan = {k.removeprefix(prefix): v for k, v in own.items() if k.startswith(prefix)}
        outside = sorted(k for k in own if not k.startswith(prefix))
        if not plan:
            return None, None, (f"hf:{family}'s base_model_tp_plan has no entry under {prefix!r} "
                                f"(its keys: {', '.join(sorted(own))}), so tp would shard nothing")
        reason = f"hf:{family}'s plan entries outside the layers ({', '.join(outside)}) are not run" if outside else ""
        return plan, None, reason
    if family in TP_PLANS:
        return dict(TP_PLANS[family]), _gpt2_tp_prepare if family == "gpt2" else None, ""
    return None, None, f"hf:{family} has no tensor-parallel plan (its config has no base_model_tp_plan)"


def sequence_plan(model: nn.Module, family: str) -> SequencePlan | None:
    """Where a pre-norm family's layer is cut along the sequence (paths under the HFLogits wrapper)."""
    if family in DECODER_FAMILIES:
        # The attention gets its hidden states as a keyword; the rotary embedding is computed on the whole
        # sequence before the first layer, so a stage that starts mid-model would compute it on T / tp:
        # sequence parallel across pipeline stages is not run for these.
        return SequencePlan(norms=("input_layernorm", "post_attention_layernorm"), attention="self_attn",
                            attention_kwarg="hidden_states", mlp="mlp", final_norm="model.model.norm")
    if family == "gpt2":  # positions are added on the first stage only, so stages shard along T too
        return SequencePlan(norms=("ln_1", "ln_2"), attention="attn", mlp="mlp", final_norm="model.transformer.ln_f",
                            stage_final_norm="ln_f")
    return None  # BERT's LayerNorms follow the residual addition inside its output modules


# ---------------------------------------------------------------------------- GPT-2's fused q/k/v


def _gpt2_tp_prepare(layer: nn.Module, tp: int) -> None:
    """GPT-2's Conv1D projections become nn.Linear (same values), and c_attn's rows are regrouped so
    that a column-wise split gives each rank whole q, k and v heads: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...].

    Its attention splits c_attn's output into q, k, v at ``split_size``, which becomes C / tp.
    """
    attn, mlp = layer.attn, layer.mlp
    for parent, name in ((attn, "c_attn"), (attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")):
        setattr(parent, name, _linear_from_conv1d(getattr(parent, name)))
    C = attn.embed_dim
    if tp > 1:
        order = torch.arange(3 * C).view(3, tp, C // tp).transpose(0, 1).reshape(-1)  # (tp, q/k/v, C / tp)
        with torch.no_grad():
            attn.c_attn.weight.copy_(attn.c_attn.weight[order])
            attn.c_attn.bias.copy_(attn.c_attn.bias[order])
    attn.split_size = C // tp


def _linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D computes x @ W + b with W (in, out): an nn.Linear holding W.T."""
    if isinstance(conv, nn.Linear):
        return conv
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        linear.bias.copy_(conv.bias)
    return linear


# ---------------------------------------------------------------------------- pipeline stages


def stage_problem(model: nn.Module, family: str) -> str:
    """Why this model's stages would not compute what its own forward does ('' if they do)."""
    c = model.config
    if family in ("mistral", "qwen2"):
        window = getattr(c, "sliding_window", None)
        uses = getattr(c, "use_sliding_window", family == "mistral")
        if uses and window is not None:
            return (f"pipeline stages of hf:{family} with a sliding attention window (sliding_window={window}) "
                    "are not run yet")
    if family == "bert" and getattr(c, "is_decoder", False):
        return "pipeline stages of hf:bert run the encoder (is_decoder=False) only"
    return ""


def tied_names(model: nn.Module, family: str) -> tuple[str, str] | None:
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out_emb is None or out_emb.weight is not in_emb.weight:
        return None
    return {"gpt2": ("wte.weight", "lm_head.weight"),
            "bert": ("embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")}.get(
        family, ("embed_tokens.weight", "lm_head.weight"))


class DecoderStage(nn.Module):
    """Layers [first, end) of a Llama-shaped decoder, as LlamaModel.forward runs them (no padding, no cache)."""

    def __init__(self, model: nn.Module, first: int, end: int, has_embedding: bool, has_head: bool) -> None:
        super().__init__()
        base = model.base_model
        self.embed_tokens = copy.deepcopy(base.embed_tokens) if has_embedding else None
        self.rotary_emb = copy.deepcopy(base.rotary_emb)
        self.layers = nn.ModuleList(copy.deepcopy(base.layers[i]) for i in range(first, end))
        self.norm = copy.deepcopy(base.norm) if has_head else None
        self.lm_head = copy.deepcopy(model.lm_head) if has_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.embed_tokens is not None else x  # (B, T, C)
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)  # (1, T)
        rope = self.rotary_emb(h, position_ids=position_ids)  # cos, sin: (1, T, head_dim)
        for layer in self.layers:  # attention_mask None: SDPA's causal mask, as for unpadded input
            h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=position_ids)
        return self.lm_head(self.norm(h)) if self.lm_head is not None else h


class GPT2Stage(nn.Module):
    """Blocks [first, end) of GPT-2, as GPT2Model.forward runs them: learned positions, then blocks, then ln_f."""

    def __init__(self, model: nn.Module, first: int, end: int, has_embedding: bool, has_head: bool) -> None:
        super().__init__()
        base = model.transformer
        self.wte = copy.deepcopy(base.wte) if has_embedding else None
        self.wpe = copy.deepcopy(base.wpe) if has_embedding else None
        self.drop = copy.deepcopy(base.drop)
        self.layers = nn.ModuleList(copy.deepcopy(base.h[i]) for i in range(first, end))
        self.ln_f = copy.deepcopy(base.ln_f) if has_head else None
        self.lm_head = copy.deepcopy(model.lm_head) if has_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wte is not None:
            position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            x = self.drop(self.wte(x) + self.wpe(position_ids))  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x)) if self.lm_head is not None else x


class BertStage(nn.Module):
    """Encoder layers [first, end) of BERT for masked LM: embeddings, layers (no mask: every token sees all), head."""

    def __init__(self, model: nn.Module, first: int, end: int, has_embedding: bool, has_head: bool) -> None:
        super().__init__()
        base = model.bert
        self.embeddings = copy.deepcopy(base.embeddings) if has_embedding else None
        self.layers = nn.ModuleList(copy.deepcopy(base.encoder.layer[i]) for i in range(first, end))
        self.cls = copy.deepcopy(model.cls) if has_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(input_ids=x) if self.embeddings is not None else x
        for layer in self.layers:
            h = layer(h)
        return self.cls(h) if self.cls is not None else h


STAGES = {**{f: DecoderStage for f in DECODER_FAMILIES}, "gpt2": GPT2Stage, "bert": BertStage}


def stage_cutter(cls: type[nn.Module]) -> Any:
    """Workload.stage for ``cls``: it gets the HFLogits wrapper, the stage wants the transformers model inside."""

    def stage(wrapped: nn.Module, first: int, end: int, has_embedding: bool, has_head: bool) -> nn.Module:
        return cls(wrapped.model, first, end, has_embedding, has_head)

    return stage
