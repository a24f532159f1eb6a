"""The prepared-corpus cache: content keys, and folders published with one atomic rename.

A corpus lives in ``cache_dir/data/<key>/`` (``train.bin``, ``val.bin``, ``meta.json`` and,
for a trained tokenizer, ``tokenizer/``). It is built in a temporary sibling folder and
renamed into place, so a reader (or a second process preparing the same data) never sees
half a folder. A cache hit reads ``meta.json`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 24  # 16 MiB: streaming unit for hashing and scanning files


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks so a large file is never held whole."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def content_key(prefix: str, settings: dict[str, Any], files: Iterable[tuple[str, Path]]) -> str:
    """``<prefix>-<hash>`` over the settings and each ``(name, path)``'s name and bytes.

    Names are what identify a file inside its input (its path relative to a folder; "" for a
    single file), so a renamed single file keeps its key and a reordered folder does not.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, path in files:
        digest.update(f"\0{name}\0{file_digest(path)}".encode())
    return f"{prefix}-{digest.hexdigest()[:24]}"


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The published corpus's meta dict, or None if ``folder`` is not published yet."""
    try:
        return json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return None


def publish(folder: Path, build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build the corpus into a temporary folder, then rename it to ``folder``; return its meta dict.

    ``build(tmp)`` writes the token files into ``tmp`` and returns the meta dict. If another
    process publishes first, its copy wins and this one's is removed (same key, same content).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        meta = build(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)  # atomic; fails if another process published first
        except OSError:
            if not (folder / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    published = read_meta(folder)
    if published is None:
        raise RuntimeError(f"{folder} was published without a meta.json")  # a bug: the rename moves it whole
    return published
