"""What a prepared corpus is (:class:`DataInfo`) and how a trial reads it (:func:`open_splits`).

numpy only: the search process and every trial process import this.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (what is happening, done, total or None): called while a corpus is first prepared, never on a
# cache hit. done/total count whatever ``what`` names (bytes, rows, documents); total None: unknown.
ProgressFn = Callable[[str, int, int | None], None]

UINT16_IDS = 1 << 16  # ids 0..65535 fit in uint16; a larger vocabulary needs uint32 token files


@dataclass(frozen=True)
class DataInfo:
    """Where a prepared corpus's two splits live, what they hold and which tokenizer made them.

    Train tokens are the first ``n_train_tokens`` of ``train_path``; val tokens are the
    ``n_val_tokens`` starting at ``val_offset`` in ``val_path`` (non-zero only when a
    single ``.bin`` is split in place). Each split is one stream of documents, each followed
    by ``eot_id``; training cuts random ``seq_len + 1`` windows out of it. Read them with
    :func:`open_splits`.
    """

    train_path: Path
    val_path: Path
    vocab_size: int
    n_train_tokens: int
    n_val_tokens: int
    source: str  # one line for humans and reports
    val_offset: int = 0
    dtype: str = "uint16"  # "uint16" or "uint32" (a tokenizer with more than 65536 ids)
    eot_id: int | None = None  # end-of-text token joining documents (None for a .bin)
    mask_id: int | None = None  # mask token for masked-LM training (None if the tokenizer has none)
    pad_id: int | None = None
    special_ids: tuple[int, ...] = ()  # every special token id (never chosen for masking)
    tokenizer_dir: Path | None = None  # a folder AutoTokenizer.from_pretrained loads (None for bytes / .bin)


def token_dtype(vocab_size: int) -> str:
    """The narrowest token file type for ids ``0 .. vocab_size - 1``: ``uint16`` or ``uint32``."""
    return "uint16" if vocab_size <= UINT16_IDS else "uint32"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cotune``, else ``~/.cache/cotune``. The one place reading that variable."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "cotune"


def open_splits(info: DataInfo) -> tuple[np.ndarray, np.ndarray]:
    """The train and val tokens as read-only memmaps of ``info.dtype``, shapes (n_train_tokens,), (n_val_tokens,)."""
    train = np.memmap(info.train_path, dtype=info.dtype, mode="r")[: info.n_train_tokens]
    val = np.memmap(info.val_path, dtype=info.dtype, mode="r")
    return train, val[info.val_offset : info.val_offset + info.n_val_tokens]
