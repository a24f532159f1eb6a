"""A nanoGPT ``uint16`` token file, used in place: its tokens are already ids, so no tokenizer applies."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np

from cotune.data.cache import CHUNK_BYTES
from cotune.data.info import DataInfo
from cotune.errors import UserError

VAL_FRACTION = 0.1  # of a single .bin without a sibling val.bin


def prepare_bin(path: Path, cache_dir: Path) -> DataInfo:
    """Val is a sibling ``val.bin`` of a ``train.bin``, else the last 10% of the file."""
    sibling = path.with_name("val.bin")
    separate_val = path.name == "train.bin" and sibling.is_file()
    for p in (path, sibling) if separate_val else (path,):
        if p.stat().st_size % 2:
            raise UserError(f"data file {p} has an odd number of bytes, so it is not a uint16 token file")
    n = path.stat().st_size // 2
    if separate_val:
        val_path, n_train, n_val, val_offset = sibling, n, sibling.stat().st_size // 2, 0
        where = f"val from {sibling}"
    else:
        n_val = int(n * VAL_FRACTION)
        val_path, n_train, val_offset = path, n - n_val, n - n_val
        where = "last 10% held out"
    vocab_size = _bin_vocab_size([path, sibling] if separate_val else [path], cache_dir)
    return DataInfo(
        train_path=path,
        val_path=val_path,
        vocab_size=vocab_size,
        n_train_tokens=n_train,
        n_val_tokens=n_val,
        source=f"token file {path} ({n} uint16 tokens, {where})",
        val_offset=val_offset,
    )


def _bin_vocab_size(paths: list[Path], cache_dir: Path) -> int:
    """Largest token id + 1, rounded up to a multiple of 64; cached by path, size and mtime (a scan reads it all)."""
    stamp = json.dumps([[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths])
    cache = cache_dir / "data" / f"bin-vocab-{hashlib.sha256(stamp.encode()).hexdigest()[:20]}.json"
    if cache.exists():
        return json.loads(cache.read_text())["vocab_size"]
    top = -1
    step = CHUNK_BYTES // 2
    for p in paths:
        tokens = np.memmap(p, dtype=np.uint16, mode="r") if p.stat().st_size else np.zeros(0, np.uint16)
        for start in range(0, len(tokens), step):
            top = max(top, int(tokens[start : start + step].max()))
    vocab_size = max(64, -(-(top + 1) // 64) * 64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")  # one per writer
    tmp.write_text(json.dumps({"vocab_size": vocab_size, "files": json.loads(stamp)}))
    tmp.replace(cache)
    return vocab_size
