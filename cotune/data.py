"""Training data: a spec (``builtin:NAME``, a text file or a nanoGPT ``.bin``) made into token files.

Tokens are stored nanoGPT-style: a flat ``uint16`` array on disk, read back with
``np.memmap``. Prepared corpora live under the cache directory, one folder per
content key, published with a single directory rename so a reader (or a second
process preparing the same data) never sees half a folder. numpy only: the search
side imports this module to learn the vocabulary size before any trial runs.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cotune.errors import UserError

BUILTINS = ("stdlib-docstrings",)
FORMAT_VERSION = 1  # bump when the layout or the corpus recipe changes; old caches are then ignored
VAL_FRACTION = 0.1
STDLIB_MAX_BYTES = 4_000_000  # cap on the builtin corpus: enough for tiny models, quick to gather
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_CHUNK_BYTES = 1 << 26  # 64 MiB: streaming unit for hashing, converting and scanning files


@dataclass(frozen=True)
class DataInfo:
    """Where a prepared corpus's two splits live and what they hold.

    Train tokens are the first ``n_train_tokens`` of ``train_path``; val tokens are the
    ``n_val_tokens`` starting at ``val_offset`` in ``val_path`` (non-zero only when a
    single ``.bin`` is split in place). Read them with :func:`open_splits`.
    """

    train_path: Path
    val_path: Path
    vocab_size: int
    n_train_tokens: int
    n_val_tokens: int
    source: str  # one line for humans and reports
    val_offset: int = 0


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cotune``, else ``~/.cache/cotune``. The one place reading that variable."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "cotune"


def prepare_data(spec: str, cache_dir: Path, *, seq_len: int = 1) -> DataInfo:
    """Turn a data spec into token files (cached), checking each split holds ``seq_len + 1`` tokens.

    ``spec`` is ``builtin:stdlib-docstrings``, a path to a text file (bytes are tokens)
    or a path to a nanoGPT ``uint16`` ``.bin`` file. A missing file, an unknown builtin
    or too little data raises :class:`~cotune.errors.UserError`.
    """
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            valid = ", ".join(f"builtin:{b}" for b in BUILTINS)
            raise UserError(f"unknown builtin data set {spec!r}; valid builtins are {valid}")
        info = _prepare_stdlib_docstrings(Path(cache_dir))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise UserError(
                f"data file {path} {what}; give a text file, a nanoGPT uint16 .bin file "
                f"or one of {', '.join(f'builtin:{b}' for b in BUILTINS)}"
            )
        info = _prepare_bin(path, Path(cache_dir)) if path.suffix == ".bin" else _prepare_text(path, Path(cache_dir))
    _check_size(info, spec, seq_len)
    return info


def open_splits(info: DataInfo) -> tuple[np.ndarray, np.ndarray]:
    """The train and val tokens as read-only ``uint16`` memmaps, shapes (n_train_tokens,), (n_val_tokens,)."""
    train = np.memmap(info.train_path, dtype=np.uint16, mode="r")[: info.n_train_tokens]
    val = np.memmap(info.val_path, dtype=np.uint16, mode="r")
    return train, val[info.val_offset : info.val_offset + info.n_val_tokens]


def _check_size(info: DataInfo, spec: str, seq_len: int) -> None:
    need = seq_len + 1  # one window of inputs plus the next-token targets
    if info.n_train_tokens < need or info.n_val_tokens < need:
        raise UserError(
            f"data {spec!r} is too small: each split needs at least seq_len + 1 = {need} tokens, "
            f"but got {info.n_train_tokens} train and {info.n_val_tokens} val tokens"
        )


# ---------------------------------------------------------------------------- cache folders


def _cached(folder: Path, build: Callable[[Path], dict[str, Any]]) -> DataInfo:
    """Return the corpus in ``folder``, building it first (into a temp folder, then one rename) if absent.

    ``build(tmp)`` writes ``train.bin``/``val.bin`` into ``tmp`` and returns the meta dict.
    """
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, folder)  # atomic; fails if another process published first
            except OSError:
                if not meta_path.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    meta = json.loads(meta_path.read_text())
    return DataInfo(
        train_path=folder / "train.bin",
        val_path=folder / "val.bin",
        vocab_size=meta["vocab_size"],
        n_train_tokens=meta["n_train_tokens"],
        n_val_tokens=meta["n_val_tokens"],
        source=meta["source"],
    )


def _write_tokens(path: Path, data: bytes) -> None:
    np.frombuffer(data, dtype=np.uint8).astype(np.uint16).tofile(path)


# ---------------------------------------------------------------------------- builtin corpus


def _prepare_stdlib_docstrings(cache_dir: Path) -> DataInfo:
    version = ".".join(map(str, sys.version_info[:3]))
    key = f"stdlib-docstrings-{sys.implementation.name}{version}-v{FORMAT_VERSION}"
    return _cached(cache_dir / "data" / key, lambda tmp: _build_stdlib_docstrings(tmp, version))


def _build_stdlib_docstrings(out: Path, version: str) -> dict[str, Any]:
    """Byte-level corpus of the standard library's docstrings, split ~90/10 by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    splits: dict[str, list[bytes]] = {"train": [], "val": []}
    files: dict[str, list[str]] = {"train": [], "val": []}
    total = 0
    for rel in _stdlib_files(root):
        docs = _docstrings(root / rel)
        if not docs:
            continue
        text = ("\n\n".join(docs) + "\n\n").encode("utf-8", errors="replace")
        split = "val" if _held_out(rel) else "train"
        splits[split].append(text)
        files[split].append(rel)
        total += len(text)
        if total >= STDLIB_MAX_BYTES:
            break
    for split, chunks in splits.items():
        _write_tokens(out / f"{split}.bin", b"".join(chunks))
    n_train, n_val = (sum(map(len, splits[s])) for s in ("train", "val"))
    return {
        "vocab_size": 256,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "source": (
            f"docstrings of the Python {version} standard library, byte-level "
            f"({len(files['train'])} train / {len(files['val'])} val files)"
        ),
        "files": files,
    }


def _stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the stdlib's ``.py`` files, tests and installed packages left out, sorted."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        rel_folder = Path(folder).relative_to(root)
        found += [(rel_folder / n).as_posix() for n in names if n.endswith(".py")]
    return sorted(found)


def _docstrings(path: Path) -> list[str]:
    """Module, class and function docstrings of one file in source order; [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for odd escapes in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in ast.walk(tree) if isinstance(n, kinds)]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))  # ast.walk is breadth-first; keep file order
    return [d for n in nodes if (d := ast.get_docstring(n))]


def _held_out(rel_path: str) -> bool:
    """Stable ~10% of files go to val: crc32 does not change between runs, unlike hash()."""
    return zlib.crc32(rel_path.encode()) % 10 == 0


# ---------------------------------------------------------------------------- user files


def _prepare_text(path: Path, cache_dir: Path) -> DataInfo:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    key = f"text-{digest.hexdigest()[:20]}-v{FORMAT_VERSION}"
    return _cached(cache_dir / "data" / key, lambda tmp: _build_text(path, tmp))


def _build_text(path: Path, out: Path) -> dict[str, Any]:
    """Bytes as tokens; the last 10% held out. Streamed, so a large file is never held whole."""
    n = path.stat().st_size
    n_val = int(n * VAL_FRACTION)
    n_train = n - n_val
    with path.open("rb") as src, (out / "train.bin").open("wb") as train, (out / "val.bin").open("wb") as val:
        done = 0
        while chunk := src.read(_CHUNK_BYTES):
            cut = max(0, min(len(chunk), n_train - done))  # bytes of this chunk that belong to train
            tokens = np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16)
            tokens[:cut].tofile(train)
            tokens[cut:].tofile(val)
            done += len(chunk)
    return {
        "vocab_size": 256,
        "n_train_tokens": n_train,
        "n_val_tokens": n_val,
        "source": f"text file {path} ({n} bytes, byte-level, last 10% held out)",
    }


def _prepare_bin(path: Path, cache_dir: Path) -> DataInfo:
    """A nanoGPT uint16 file used in place; val is a sibling ``val.bin`` of ``train.bin``, else the last 10%."""
    path = path.resolve()
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
    step = _CHUNK_BYTES // 2
    for p in paths:
        tokens = np.memmap(p, dtype=np.uint16, mode="r") if p.stat().st_size else np.zeros(0, np.uint16)
        for start in range(0, len(tokens), step):
            top = max(top, int(tokens[start : start + step].max()))
    vocab_size = max(64, -(-(top + 1) // 64) * 64)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"vocab_size": vocab_size, "files": json.loads(stamp)}))
    tmp.replace(cache)
    return vocab_size
