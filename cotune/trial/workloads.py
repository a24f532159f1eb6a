"""Workloads by name, and what is applied to a model from outside it (activation checkpointing).

A workload is a plain callable ``build(WorkloadConfig) -> nn.Module`` whose module maps
token ids (B, T) to logits (B, T, V) and exposes its transformer layers as
``model.blocks`` (an ``nn.ModuleList``), so layer-wise wrappers apply without
editing the model. A user's own workload plugs in as ``package.module:function``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from cotune.config import WorkloadConfig
from cotune.trial.model import GPT, GPTConfig

BuildFn = Callable[[WorkloadConfig], nn.Module]


def build_gpt(cfg: WorkloadConfig) -> nn.Module:
    """The nanoGPT-like decoder in :mod:`cotune.trial.model`."""
    return GPT(
        GPTConfig(
            vocab_size=cfg.vocab_size, seq_len=cfg.seq_len, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd
        )
    )


WORKLOADS: dict[str, BuildFn] = {"gpt": build_gpt}


def get_workload(name: str) -> BuildFn:
    """The build function registered as ``name``, or imported from ``package.module:function``."""
    if name in WORKLOADS:
        return WORKLOADS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
        fn = getattr(importlib.import_module(module_name), attr, None)
        if not callable(fn):
            raise ValueError(f"workload {name!r}: module {module_name!r} has no callable {attr!r}")
        return fn
    raise ValueError(
        f"unknown workload {name!r}; valid names are {', '.join(sorted(WORKLOADS))} "
        "or a 'package.module:function' that builds an nn.Module from a WorkloadConfig"
    )


def build_model(cfg: WorkloadConfig) -> nn.Module:
    """Build the workload ``cfg.model`` names, for ``cfg``'s shape."""
    model = get_workload(cfg.model)(cfg)
    if not isinstance(model, nn.Module):
        raise ValueError(f"workload {cfg.model!r} must return an nn.Module, but returned {type(model).__name__}")
    return model


class CheckpointedBlock(nn.Module):
    """Runs ``block`` without keeping its activations; the backward pass recomputes them."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # use_reentrant=False: the recommended implementation; works with torch.compile and
        # with inputs that do not require grad.
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Wrap every layer of ``model.blocks`` in :class:`CheckpointedBlock`, in place; returns ``model``."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(
            f"activation checkpointing needs the model to expose its layers as an nn.ModuleList "
            f"named 'blocks', but {type(model).__name__}.blocks is {type(blocks).__name__}"
        )
    for i, block in enumerate(blocks):
        if not isinstance(block, CheckpointedBlock):
            blocks[i] = CheckpointedBlock(block)
    return model
