"""Workloads: what a trial trains, and what cotune needs to know to lay it out.

A workload is a plain callable ``build(WorkloadConfig) -> Workload`` registered by name
(``gpt``), a Hugging Face architecture (``hf:<model_type>`` or ``hf:/local/dir``, see
:mod:`cotune.trial.hf`), or a user's ``package.module:function``. The :class:`Workload`
it returns is the model plus the facts parallelism is applied from outside with: where
its repeated layers are (FSDP/DDP units, activation checkpointing, pipeline cuts), a
tensor-parallel plan over one layer, how to cut a pipeline stage, which matrices are tied.
A knob whose fact is missing is infeasible before launch, with that reason
(:func:`unsupported`), never discovered by a crash.

The user's contract (README, "Your own model"): the function gets the study's
``WorkloadConfig`` (``config`` holds the space's ``workload.config`` fields, ``seq_len``
and ``vocab_size`` are set) and returns a ``Workload`` (or a bare ``nn.Module``, which
then runs with data parallelism only).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from cotune.config import KERNELS, TRAINING_OBJECTIVES, WorkloadConfig
from cotune.trial.model import GPT, GPTConfig

TP_STYLES = ("colwise", "rowwise")  # torch's ColwiseParallel / RowwiseParallel on an nn.Linear


@dataclass(frozen=True)
class SequencePlan:
    """Where sequence parallelism (Korthikanti et al. 2022) shards a pre-norm layer along T.

    The norms run on T / tp positions; the attention and the MLP gather their input to the
    whole sequence once, and their row-wise output projections (the plan's ``rowwise``
    entries) reduce-scatter back to T / tp. The first layer cuts its input; the final norm
    gathers it again.
    """

    norms: tuple[str, ...]  # per layer, e.g. ("input_layernorm", "post_attention_layernorm")
    attention: str  # per layer: the attention module
    mlp: str  # per layer: the MLP module
    final_norm: str  # path in the model of the norm before the output head
    attention_kwarg: str | None = None  # the keyword its hidden states arrive under (None: first positional)
    stage_final_norm: str | None = None  # the same norm in a pipeline stage (None: not run with pp > 1)


@dataclass
class Workload:
    """A model and how to parallelise it. Only ``model`` is required.

    - ``model``: token ids (B, T) -> logits (B, T, V).
    - ``layers``: dotted path of the ``nn.ModuleList`` of repeated layers inside ``model``
      (``"blocks"``, ``"model.model.layers"``). FSDP shards per layer, activation
      checkpointing wraps each layer; without it, neither runs.
    - ``tp_plan``: submodule of one layer -> ``"colwise"`` or ``"rowwise"`` (Megatron's split:
      column-wise into heads / MLP width, row-wise back, one all-reduce per pair). Every key
      must name an ``nn.Linear`` of every layer. Without it, tp > 1 does not run.
    - ``objective``: ``causal_lm`` (targets are the next tokens) or ``masked_lm`` (15% of
      tokens masked; targets are the originals there, -100 elsewhere).
    - ``stage``: ``(model, first_layer, end_layer, has_embedding, has_head) -> nn.Module``, one
      pipeline stage holding layers [first_layer, end_layer) at ``stage_layers``, whose
      forward takes ids (first stage) or hidden states (B, T, C) and returns hidden states or
      logits (last stage). Without it, pp > 1 does not run.
    - ``tied``: (parameter name on the first stage, on the last stage) of a matrix the full
      model ties (embedding and output head): their gradients are summed across stages.
    - ``tp_prepare``: rewrites one layer in place before its plan applies, for tp degree
      ``tp`` (GPT-2's fused q/k/v matrix becomes three column blocks per rank).
    """

    model: nn.Module
    layers: str | None = None
    tp_plan: dict[str, str] | None = None
    objective: str = "causal_lm"
    stage: Callable[[nn.Module, int, int, bool, bool], nn.Module] | None = None
    stage_layers: str | None = None  # where a stage holds its layers (default: ``layers``)
    tied: tuple[str, str] | None = None
    tp_prepare: Callable[[nn.Module, int], None] | None = None
    sequence_plan: SequencePlan | None = None  # without it, sequence_parallel does not run
    kernels: tuple[str, ...] = ()  # Triton kernels that fit this model (cotune.trial.kernels)
    n_params: int | None = None  # parameters counted for FLOPs (default: all, tied matrices once)
    extra: dict[str, Any] = field(default_factory=dict)  # facts for the description (family, class names)

    def layer_list(self, module: nn.Module | None = None, *, stage: bool = False) -> nn.ModuleList:
        """The ``nn.ModuleList`` of layers of ``module`` (default: the model; a stage's with ``stage``)."""
        path = (self.stage_layers or self.layers) if stage else self.layers
        if path is None:
            raise ValueError(f"workload {type(self.model).__name__} names no layer list (Workload.layers)")
        found = (module or self.model).get_submodule(path)
        if not isinstance(found, nn.ModuleList):
            raise ValueError(f"Workload.layers={path!r} must name an nn.ModuleList, but it is {type(found).__name__}")
        return found

    def count_params(self) -> int:
        return self.n_params if self.n_params is not None else sum(p.numel() for p in self.model.parameters())


def unsupported(w: Workload) -> dict[str, str]:
    """Why each layout knob cannot run on this workload ('' where it can), checked before launch."""
    name = w.extra.get("architecture") or type(w.model).__name__
    out = {"activation_checkpointing": "", "tp": "", "pp": "", "sequence_parallel": "",
           "sequence_parallel_with_pp": ""}
    if w.layers is None:
        out["activation_checkpointing"] = f"{name} names no layer list to checkpoint (Workload.layers)"
    if not w.tp_plan:
        out["tp"] = f"{name} has no tensor-parallel plan (Workload.tp_plan)"
    else:
        out["tp"] = tp_plan_problem(w)
    if w.stage is None:
        out["pp"] = w.extra.get("pp_reason") or f"{name} has no pipeline stage cutter (Workload.stage)"
    elif w.layers is None:
        out["pp"] = f"{name} names no layer list to cut into stages (Workload.layers)"
    if w.sequence_plan is None:
        out["sequence_parallel"] = w.extra.get("sp_reason") or f"{name} has no sequence-parallel plan (Workload.sequence_plan)"
    elif w.sequence_plan.stage_final_norm is None:
        out["sequence_parallel_with_pp"] = f"sequence parallel across pipeline stages of {name} is not run yet"
    return out


def tp_plan_problem(w: Workload) -> str:
    """Why ``w.tp_plan`` would shard nothing or the wrong thing ('' when every key names an nn.Linear)."""
    if w.layers is None:
        return "a tensor-parallel plan needs the layer list it applies to (Workload.layers)"
    bad = {k: v for k, v in w.tp_plan.items() if v not in TP_STYLES}
    if bad:
        key, style = next(iter(bad.items()))
        return (f"tensor-parallel style {style!r} (plan key {key!r}) is not run by cotune; "
                f"it runs {' and '.join(TP_STYLES)} on nn.Linear layers")
    layers = w.layer_list()
    if not len(layers):
        return "the layer list is empty"
    layer = copy.deepcopy(layers[0]) if w.tp_prepare else layers[0]
    if w.tp_prepare:
        w.tp_prepare(layer, 1)
    for key in w.tp_plan:
        try:
            sub = layer.get_submodule(key)
        except AttributeError:
            return (f"tensor-parallel plan key {key!r} matches no submodule of {type(layer).__name__}, "
                    "so tp would shard nothing")
        if not isinstance(sub, nn.Linear):
            return f"tensor-parallel plan key {key!r} names a {type(sub).__name__}, not an nn.Linear"
    return ""


# ---------------------------------------------------------------------------- the built-in GPT

GPT_SEQUENCE_PLAN = SequencePlan(norms=("ln_1", "ln_2"), attention="attn", mlp="mlp", final_norm="ln_f",
                                 stage_final_norm="ln_f")
GPT_TP_PLAN = {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.proj": "rowwise",
               "mlp.fc": "colwise", "mlp.proj": "rowwise"}


def build_gpt(cfg: WorkloadConfig) -> Workload:
    """The nanoGPT-like decoder in :mod:`cotune.trial.model`."""
    model = GPT(GPTConfig(vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head,
                          n_embd=cfg.n_embd))
    return Workload(model=model, layers="blocks", tp_plan=dict(GPT_TP_PLAN), stage=gpt_stage,
                    tied=("wte.weight", "lm_head.weight"), sequence_plan=GPT_SEQUENCE_PLAN,
                    kernels=KERNELS, n_params=model.n_params())


def gpt_stage(model: nn.Module, first: int, end: int, has_embedding: bool, has_head: bool) -> nn.Module:
    """A copy of the GPT holding layers [first, end); the ends it does not own are None (its forward skips them)."""
    m = copy.deepcopy(model)
    m.blocks = nn.ModuleList(list(m.blocks)[first:end])
    if not has_embedding:
        m.wte = None
        m.wpe = None
    if not has_head:
        m.ln_f = None
        m.lm_head = None
    return m


WORKLOADS: dict[str, Callable[[WorkloadConfig], Workload]] = {"gpt": build_gpt}


def get_workload(name: str) -> Callable[[WorkloadConfig], Any]:
    """The build function registered as ``name``, ``hf:...``'s, or one imported from ``package.module:function``."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if name.startswith("hf:"):
        from cotune.trial.hf import build_hf

        return build_hf
    if ":" in name:
        module_name, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module_name), attr, None)
        if not callable(fn):
            raise ValueError(f"workload {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    raise ValueError(
        f"unknown workload {name!r}; valid names are {', '.join(sorted(WORKLOADS))}, hf:<model_type>, "
        "hf:/local/dir or a 'package.module:function' that builds a Workload from a WorkloadConfig"
    )


def build_workload(cfg: WorkloadConfig) -> Workload:
    """Build the workload ``cfg.model`` names, for ``cfg``'s shape; a bare module gets data parallelism only."""
    built = get_workload(cfg.model)(cfg)
    if isinstance(built, nn.Module):
        built = Workload(model=built)
    if not isinstance(built, Workload) or not isinstance(built.model, nn.Module):
        raise ValueError(f"workload {cfg.model!r} must return a Workload or an nn.Module, "
                         f"but returned {type(built).__name__}")
    if built.objective not in TRAINING_OBJECTIVES:
        raise ValueError(f"Workload.objective must be one of {TRAINING_OBJECTIVES}, but got {built.objective!r}")
    return built


def build_model(cfg: WorkloadConfig) -> nn.Module:
    """Only the model of :func:`build_workload`."""
    return build_workload(cfg).model


# ---------------------------------------------------------------------------- activation checkpointing


class CheckpointedBlock(nn.Module):
    """Runs ``block`` without keeping its activations; the backward pass recomputes them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # use_reentrant=False: the recommended implementation; works with torch.compile and
        # with inputs that do not require grad.
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(layers: nn.ModuleList) -> nn.ModuleList:
    """Wrap every layer of ``layers`` in :class:`CheckpointedBlock`, in place; returns ``layers``."""
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"activation checkpointing needs the layers as an nn.ModuleList, got {type(layers).__name__}")
    for i, block in enumerate(layers):
        if not isinstance(block, CheckpointedBlock):
            layers[i] = CheckpointedBlock(block)
    return layers
