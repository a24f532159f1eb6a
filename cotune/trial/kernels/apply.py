"""Swap cotune's Triton kernels into a GPT from outside, as parallelism is applied: the model
stays plain PyTorch, and the swapped modules keep the same parameters under the same names.

- ``block.mlp`` becomes :class:`TritonMLP`: its ``fc`` matmul, bias and GELU in one kernel
  (forward and backward), ``proj`` unchanged.
- every ``nn.LayerNorm`` (ln_1, ln_2, ln_f) becomes :class:`TritonLayerNorm`.
- the training loss becomes :func:`cross_entropy_loss`'s kernel (loss and logits gradient in
  one pass); evaluation keeps PyTorch's cross-entropy, which checks the kernel's training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from cotune.config import KernelConfig
from cotune.tiles import kernel_tiles
from cotune.trial.kernels.cross_entropy import cross_entropy
from cotune.trial.kernels.layernorm import layer_norm
from cotune.trial.kernels.mlp import linear_bias_gelu


class TritonMLP(nn.Module):
    """gelu_tanh(x @ fc.weight.T + fc.bias) in one Triton kernel, then ``proj``: (B, T, C) -> (B, T, C)."""

    def __init__(self, fc: nn.Linear, proj: nn.Linear, config: KernelConfig) -> None:
        super().__init__()
        self.fc, self.proj = fc, proj
        self.tiles = asdict(kernel_tiles(config, "mlp"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # autocast does not reach inside a custom kernel:
            x = x.to(torch.get_autocast_dtype(x.device.type))  # cast as it would for a matmul (the kernel casts W, b)
        return self.proj(linear_bias_gelu(x, self.fc.weight, self.fc.bias, **self.tiles))


class TritonLayerNorm(nn.Module):
    """``F.layer_norm`` over the last dim in a Triton kernel, with the wrapped LayerNorm's weight and bias."""

    def __init__(self, ln: nn.LayerNorm, config: KernelConfig) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = ln.weight, ln.bias, ln.eps
        t = kernel_tiles(config, "layernorm")
        self.block_size, self.num_warps = t.block_size, t.num_warps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # autocast runs layer_norm in fp32 (its input here is the fp32 residual stream): so does the kernel
        return layer_norm(x, self.weight, self.bias, self.eps, block_size=self.block_size, num_warps=self.num_warps)


def apply_kernels(model: nn.Module, config: KernelConfig) -> nn.Module:
    """Swap the kernels ``config`` selects into ``model`` (a GPT: ``blocks`` of ``ln_1, attn, ln_2, mlp``)."""
    if config.mlp != "triton" and config.layernorm != "triton":
        return model  # nothing inside the model (the cross-entropy kernel is the loss, outside it)
    if not hasattr(model, "blocks"):
        raise ValueError(f"Triton kernels swap into cotune's GPT (model.blocks), but got {type(model).__name__}")
    for block in model.blocks:
        if config.mlp == "triton":
            block.mlp = TritonMLP(block.mlp.fc, block.mlp.proj, config)
        if config.layernorm == "triton":
            block.ln_1 = TritonLayerNorm(block.ln_1, config)
            block.ln_2 = TritonLayerNorm(block.ln_2, config)
    if config.layernorm == "triton":
        model.ln_f = TritonLayerNorm(model.ln_f, config)
    return model


def cross_entropy_loss(config: KernelConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The training loss (mean over tokens of logits (B, T, V) against targets (B, T)), or None for PyTorch's."""
    if config.cross_entropy != "triton":
        return None
    t = kernel_tiles(config, "cross_entropy")

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The kernel reads the logits in their own dtype with fp32 math: no fp32 copy of (B, T, V). It
        # writes their gradient over them: lm_head's backward needs its input and weight, not its output,
        # and nothing else reads the logits (a misuse would fail loudly on the bumped version counter).
        return cross_entropy(logits.flatten(0, 1), y.flatten(), block_size=t.block_size, num_warps=t.num_warps,
                             overwrite_logits=True)

    return loss
