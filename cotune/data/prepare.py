"""prepare_data: a data spec and a tokenizer made into cached token files, and the one-line source.

A miss runs three passes: read and normalise the documents into a spill file (choosing
each one's split), train the tokenizer on the train documents if it is ``bpe:<N>``, then
tokenize all documents in batches into ``train.bin`` / ``val.bin``, each document followed
by the end-of-text id. A hit reads ``meta.json`` only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from cotune.data.builtin import python_version
from cotune.data.cache import content_key, publish, read_meta
from cotune.data.documents import NORMALISATION, VAL_ONE_IN, DocumentStore
from cotune.data.info import DataInfo, ProgressFn, token_dtype
from cotune.data.nanogpt import prepare_bin
from cotune.data.sources import Source, find_source, read_documents
from cotune.data.tokenizer import (
    Encoder,
    TokenizerChoice,
    byte_encoder,
    load_local,
    parse_tokenizer,
    train_bpe,
)
from cotune.errors import UserError

FORMAT_VERSION = 2  # bump when the layout or a recipe changes; old caches are then ignored
_TOKENIZER_DIR = "tokenizer"  # a trained BPE's folder inside the corpus folder


def prepare_data(spec: str, cache_dir: Path, *, seq_len: int = 1, tokenizer: str = "bytes",
                 text_field: str = "text", progress: ProgressFn | None = None) -> DataInfo:
    """Turn a data spec into token files (cached), checking each split holds ``seq_len + 1`` tokens.

    ``spec`` is ``builtin:stdlib-docstrings``, a text file, a folder of text files, a JSON Lines,
    Parquet or Arrow file (or a folder of such shards; ``text_field`` names the text) or a
    nanoGPT ``uint16`` ``.bin`` (used in place). ``tokenizer`` is ``bytes``, ``bpe:<vocab size>``
    or a local tokenizer folder. ``progress`` hears of the first preparation, not of a cache hit.
    A mistake in any of these raises :class:`~cotune.errors.UserError`.
    """
    cache_dir = Path(cache_dir)
    source = find_source(spec)
    if source.kind == "bin":
        if tokenizer != "bytes":
            raise UserError(f"a nanoGPT .bin file holds token ids already, so it takes no tokenizer, but got "
                            f"tokenizer {tokenizer!r} for {source.path}; leave the tokenizer at bytes")
        info = prepare_bin(source.files[0], cache_dir)
    else:
        choice = parse_tokenizer(tokenizer)
        settings = {
            "format": FORMAT_VERSION, "kind": source.kind, "normalisation": NORMALISATION,
            "val": f"crc32 % {VAL_ONE_IN} == 0", "tokenizer": choice.key_setting(),
            "text_field": text_field if source.uses_field else None,
            "python": python_version() if source.kind == "builtin" else None,  # the stdlib is the builtin corpus
        }
        key = content_key(source.kind, settings, [*source.key_files(), *choice.key_files()])
        folder = cache_dir / "data" / key
        meta = read_meta(folder)
        if meta is None:
            meta = publish(folder, lambda tmp: _build(tmp, source, choice, text_field, progress))
        info = _info(folder, meta, source, choice, text_field)
    _check_size(info, spec, seq_len)
    return info


def _check_size(info: DataInfo, spec: str, seq_len: int) -> None:
    need = seq_len + 1  # one window of inputs plus the next-token targets
    if info.n_train_tokens < need or info.n_val_tokens < need:
        raise UserError(
            f"data {spec!r} is too small: each split needs at least seq_len + 1 = {need} tokens, "
            f"but got {info.n_train_tokens} train and {info.n_val_tokens} val tokens"
        )


def _info(folder: Path, meta: dict[str, Any], source: Source, choice: TokenizerChoice, text_field: str) -> DataInfo:
    """The DataInfo of a published corpus. Paths and labels come from this call's spec, not from meta:
    the key is by content, so the same corpus may be reached from another path."""
    tokenizer_dir = {"bytes": None, "bpe": folder / _TOKENIZER_DIR, "local": choice.folder}[choice.kind]
    noun = "files" if source.kind == "builtin" else "documents"
    n_train, n_val = meta["documents"]["train"], meta["documents"]["val"]
    return DataInfo(
        train_path=folder / "train.bin",
        val_path=folder / "val.bin",
        vocab_size=meta["vocab_size"],
        n_train_tokens=meta["n_train_tokens"],
        n_val_tokens=meta["n_val_tokens"],
        source=(f"{source.label(text_field)}: {n_train + n_val:,} {noun} ({n_train:,} train / {n_val:,} val), "
                f"{choice.describe(meta['vocab_size'])}"),
        dtype=meta["dtype"],
        eot_id=meta["eot_id"],
        mask_id=meta["mask_id"],
        pad_id=meta["pad_id"],
        special_ids=tuple(meta["special_ids"]),
        tokenizer_dir=tokenizer_dir,
    )


def _build(out: Path, source: Source, choice: TokenizerChoice, text_field: str,
           progress: ProgressFn | None) -> dict[str, Any]:
    """Read, split, (train,) tokenize into ``out``; return the meta dict."""
    split_keys: list[str] = []  # the builtin's files, listed in meta by split
    with DocumentStore(out / "documents.tmp") as store:
        for text, split_key in read_documents(source, text_field, progress, out):
            if store.add(text, split_key) and split_key is not None:
                split_keys.append(split_key)
    n_train, n_val = store.counts
    if n_train + n_val < 2:
        what = f"data {source.path or source.spec}" + (f" (text field {text_field!r})" if source.uses_field else "")
        dropped = f"; {store.n_dropped:,} empty ones were dropped" if store.n_dropped else ""
        raise UserError(
            f"the train/validation split is by document, so the data needs at least 2 non-empty documents, "
            f"but {what} holds {n_train + n_val}{dropped}"
            + (" (a text file's documents are separated by blank lines or <|endoftext|>)" if source.kind == "text"
               else "")
        )
    encoder = _encoder(choice, store, out, progress)
    counts = _tokenize(store, encoder, out, progress)
    store.path.unlink()
    meta: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "vocab_size": encoder.vocab_size,
        "dtype": token_dtype(encoder.vocab_size),
        "n_train_tokens": counts[0],
        "n_val_tokens": counts[1],
        "documents": {"train": n_train, "val": n_val, "dropped_empty": store.n_dropped},
        "eot_id": encoder.eot_id,
        "mask_id": encoder.mask_id,
        "pad_id": encoder.pad_id,
        "special_ids": list(encoder.special_ids),
        "tokenizer": choice.key_setting(),
        "python": sys.version.split()[0],
    }
    if split_keys:
        meta["files"] = {"train": [k for i, k in enumerate(split_keys) if not store.is_val(i)],
                         "val": [k for i, k in enumerate(split_keys) if store.is_val(i)]}
    return meta


def _encoder(choice: TokenizerChoice, store: DocumentStore, out: Path, progress: ProgressFn | None) -> Encoder:
    if choice.kind == "bytes":
        return byte_encoder()
    if choice.kind == "bpe":
        return train_bpe(choice.size, store.texts("train"), store.counts[0], out / _TOKENIZER_DIR, progress)
    assert choice.folder is not None
    return load_local(choice.folder)


def _tokenize(store: DocumentStore, encoder: Encoder, out: Path, progress: ProgressFn | None) -> tuple[int, int]:
    """Write each split as one stream: every document's ids, then the end-of-text id. Returns token counts."""
    dtype = np.dtype(token_dtype(encoder.vocab_size))
    eot = np.array([encoder.eot_id], dtype=dtype)
    n_docs = sum(store.counts)
    counts = [0, 0]
    done = 0
    with (out / "train.bin").open("wb") as train_file, (out / "val.bin").open("wb") as val_file:
        files = (train_file, val_file)
        for texts, is_val in store.batches():
            pieces: list[list[np.ndarray]] = [[], []]  # train, val
            for ids, val in zip(encoder.encode_batch(texts), is_val, strict=True):
                pieces[int(val)] += [np.asarray(ids, dtype=dtype), eot]
            for split, arrays in enumerate(pieces):
                if arrays:
                    tokens = np.concatenate(arrays)
                    tokens.tofile(files[split])
                    counts[split] += len(tokens)
            done += len(texts)
            if progress:
                progress("tokenizing", done, n_docs)
    return counts[0], counts[1]
