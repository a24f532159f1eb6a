"""Inputs and targets for each training objective, cut out of a token stream (numpy, no torch).

- causal_lm: a window of T + 1 tokens gives inputs (T) and next-token targets (T).
- masked_lm (BERT, Devlin et al. 2019): a window of T tokens; 15% of its positions (never a
  special token) are predicted: 80% of them shown as the mask token, 10% as a random token,
  10% unchanged. Targets are the original tokens there and ``IGNORE`` elsewhere, which
  PyTorch's cross-entropy skips, so the loss is the mean over predicted positions.

Every rank draws the same per-window mask seeds for the whole global batch and builds its
own windows only, so every layout sees the same masks; validation masks come from a fixed
seed, so every trial of a study is scored on the same masked windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
EVAL_MASK_SEED = 20_250_101  # one set of validation masks for every trial of every study


@dataclass(frozen=True)
class Masking:
    """What masked-LM batches need from the tokenizer."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    rate: float = 0.15


def window_tokens(objective: str) -> int:
    """Extra tokens a window holds beyond seq_len: the shifted target of causal LM."""
    return 1 if objective == "causal_lm" else 0


def causal_lm(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-token targets, each (B, T) int64, for windows starting at ``starts``."""
    xy = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)  # (B, T + 1)
    return xy[:, :-1], xy[:, 1:]


def masked_lm(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int, seeds: np.ndarray, masking: Masking
) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs and targets (IGNORE where nothing is predicted), each (B, T) int64.

    Window i's masks are drawn from its own generator, seeded with ``seeds[i]``: a rank draws
    the seeds of the whole global batch (one integer per window) and builds only its own windows.
    """
    w = tokens[starts[:, None] + np.arange(seq_len)].astype(np.int64)  # (B, T)
    chosen = np.empty(w.shape, dtype=bool)
    action = np.empty(w.shape)
    random_tokens = np.empty(w.shape, dtype=np.int64)
    for i, seed in enumerate(seeds):
        # Everything is drawn for every position, used or not, so the draws do not depend on the data.
        rng = np.random.default_rng(int(seed))
        chosen[i] = rng.random(seq_len) < masking.rate
        action[i] = rng.random(seq_len)
        random_tokens[i] = rng.integers(0, masking.vocab_size, size=seq_len)
    special = np.isin(w, np.asarray(masking.special_ids, dtype=np.int64))
    chosen &= ~special
    # A window with nothing to predict would make its loss 0/0: predict its first ordinary token instead.
    empty = ~chosen.any(axis=1) & (~special).any(axis=1)
    chosen[empty, np.argmax(~special[empty], axis=1)] = True
    x = w.copy()
    x[chosen & (action < 0.8)] = masking.mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    x[swap] = random_tokens[swap]
    y = np.where(chosen, w, IGNORE)
    return x, y


def mask_seeds(rng: np.random.Generator, n: int) -> np.ndarray:
    """One seed per window for :func:`masked_lm`, drawn from ``rng``."""
    return rng.integers(0, 2**63 - 1, size=n, dtype=np.int64)
