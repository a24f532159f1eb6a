"""A decoder-only GPT in the manner of nanoGPT: readable in one sitting.

Shapes: B batch, T sequence length, C = n_embd channels, H heads, V vocabulary.
No dropout (short pre-training runs do not need it, and it would make two equal
configs measure different losses). Parallelism and activation checkpointing are
applied from outside through ``model.blocks``; nothing of the kind lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 64  # the longest sequence the position embedding covers
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(
                f"n_embd % n_head == 0 must hold, but got n_embd={cfg.n_embd}, n_head={cfg.n_head}"
            )
        self.head_dim = cfg.n_embd // cfg.n_head
        # Separate q, k, v projections (not one fused qkv matrix) so tensor parallelism can
        # split each column-wise into whole heads.
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, C) -> (B, H, T, D): heads become a batch dimension. H is read from the tensor,
        # not the config: under tensor parallelism each rank holds H / tp heads.
        q, k, v = (p(x).view(B, T, -1, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D), flash where available
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # heads side by side again
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's tanh approximation of GELU, which the fused Triton MLP kernel computes too.
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids (B, T) in, next-token logits (B, T, V) out. The loss is the caller's."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding, (V, C)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)  # position embedding, (T, C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017): one (V, C) matrix
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual projection gets std 0.02 / sqrt(2 * n_layer), so the
        # residual stream's variance does not grow with depth (two additions per block).
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def n_params(self, non_embedding: bool = True) -> int:
        """Parameter count; ``non_embedding`` leaves out the position embedding.

        The token embedding stays in, as in nanoGPT: being tied to ``lm_head`` its
        weights do a (B*T, C) x (C, V) matmul every step, so they count for FLOPs.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        return n - self.wpe.weight.numel() if non_embedding else n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V).

        A pipeline stage is this module with the parts it does not own set to None
        (``cotune.trial.parallelize``): without ``wte`` the input is the previous stage's
        hidden states (B, T, C); without ``lm_head`` the output is hidden states too.
        """
        if self.wte is not None:
            T = x.shape[1]
            if T > self.cfg.seq_len:
                raise ValueError(f"sequence length T <= seq_len must hold, but got T={T}, seq_len={self.cfg.seq_len}")
            pos = torch.arange(T, device=x.device)  # (T,)
            x = self.wte(x) + self.wpe(pos)  # (B, T, C) + (T, C) broadcast
        for block in self.blocks:
            x = block(x)  # (B, T, C)
        if self.lm_head is not None:
            x = self.lm_head(self.ln_f(x))  # (B, T, V)
        return x
