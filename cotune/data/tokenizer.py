"""The three tokenizers: ``bytes``, ``bpe:<vocab size>`` (trained here) and a local tokenizer folder.

Each becomes an :class:`Encoder`: a batch encoder plus the ids the token stream and the
trainer need (end-of-text joining documents, mask, pad, every special id). ``tokenizers``
and ``transformers`` are imported inside the functions that need them: a cache hit never
imports them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cotune.data.info import ProgressFn
from cotune.errors import UserError

EOT, MASK, PAD = "<|endoftext|>", "<mask>", "<pad>"
BPE_SPECIALS = (EOT, MASK, PAD)  # ids 0, 1, 2 of a trained BPE
BYTES_EOT, BYTES_MASK = 256, 257  # after the 256 byte values
BYTES_VOCAB = 258
BPE_MIN_VOCAB = 256 + len(BPE_SPECIALS)  # the byte alphabet and the special tokens, before any merge
# Files one of which a tokenizer folder holds (what save_pretrained writes, or a slow tokenizer's vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
# A model checkpoint folder often doubles as its tokenizer folder: its weights are not the tokenizer's
# and hashing gigabytes for the cache key on every trial would be slow.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf"}


def _valid_tokenizers() -> str:
    return (f"give bytes, bpe:<vocab size> (at least {BPE_MIN_VOCAB}, e.g. bpe:4096) or a local tokenizer folder "
            "(holding tokenizer.json or tokenizer_config.json, as save_pretrained writes)")


@dataclass(frozen=True)
class TokenizerChoice:
    """A tokenizer spec resolved: ``bytes``, ``bpe`` (with ``size``) or ``local`` (with ``folder``)."""

    kind: str
    size: int = 0
    folder: Path | None = None

    def key_setting(self) -> str:
        """The spec as it enters the cache key; a local folder enters by its files' contents instead."""
        return {"bytes": "bytes", "bpe": f"bpe:{self.size}", "local": "local"}[self.kind]

    def key_files(self) -> list[tuple[str, Path]]:
        """(name, path) of the local folder's tokenizer files, for the cache key; [] for bytes and bpe."""
        if self.folder is None:
            return []
        return [(f"tokenizer/{p.name}", p) for p in sorted(self.folder.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in _WEIGHT_SUFFIXES]

    def describe(self, vocab_size: int) -> str:
        if self.kind == "bytes":
            return "byte-level"
        if self.kind == "bpe":
            short = f" ({vocab_size:,} tokens: the train split allows no more merges)" if vocab_size < self.size else ""
            return f"BPE {self.size}{short} trained on the train split"
        return f"tokenizer {self.folder} ({vocab_size:,} tokens)"


def parse_tokenizer(spec: str) -> TokenizerChoice:
    """Resolve ``bytes``, ``bpe:<N>`` or a folder path; a UserError names the spec and what is valid."""
    if spec == "bytes":
        return TokenizerChoice("bytes")
    if spec.startswith("bpe:"):
        size = spec.removeprefix("bpe:")
        if not size.isdigit() or int(size) < BPE_MIN_VOCAB:
            raise UserError(f"bpe:<vocab size> needs a whole number of at least {BPE_MIN_VOCAB} (256 bytes and "
                            f"{len(BPE_SPECIALS)} special tokens), but got tokenizer {spec!r}; e.g. bpe:4096")
        return TokenizerChoice("bpe", size=int(size))
    folder = Path(spec).expanduser().resolve()
    if not folder.exists():
        raise UserError(f"tokenizer folder {folder} does not exist; {_valid_tokenizers()}")
    if not folder.is_dir():
        raise UserError(f"tokenizer {folder} is a file, not a folder; {_valid_tokenizers()}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"tokenizer folder {folder} holds none of {', '.join(TOKENIZER_FILES)}; {_valid_tokenizers()}")
    return TokenizerChoice("local", folder=folder)


@dataclass(frozen=True)
class Encoder:
    """A batch encoder (documents to token ids, no special tokens added) and the ids around it."""

    encode_batch: Callable[[list[str]], Sequence[Sequence[int] | np.ndarray]]
    vocab_size: int
    eot_id: int
    mask_id: int | None
    pad_id: int | None
    special_ids: tuple[int, ...]


def byte_encoder() -> Encoder:
    """UTF-8 bytes are ids 0-255; 256 is ``<|endoftext|>``, 257 ``<mask>``."""
    return Encoder(
        encode_batch=lambda texts: [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts],
        vocab_size=BYTES_VOCAB, eot_id=BYTES_EOT, mask_id=BYTES_MASK, pad_id=None,
        special_ids=(BYTES_EOT, BYTES_MASK),
    )


def train_bpe(size: int, train_batches: Iterable[list[str]], n_docs: int, out: Path,
              progress: ProgressFn | None) -> Encoder:
    """Train a byte-level BPE of ``size`` tokens on the train documents and save it to ``out`` for AutoTokenizer.

    Deterministic: the same documents give the same merges (ties break by pair, not by hash order).
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("tokenizer bpe:<vocab size> needs the tokenizers package; pip install tokenizers") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=list(BPE_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes, no unknown token
    )
    what = f"training BPE {size}"

    def fed() -> Iterator[list[str]]:
        done = 0
        for batch in train_batches:
            yield batch
            done += len(batch)
            if progress:
                progress(what, done, n_docs)

    tokenizer.train_from_iterator(fed(), trainer=trainer, length=n_docs)
    _save_for_transformers(tokenizer, out)
    # Text that spells "<|endoftext|>" is text, as with the bytes tokenizer: only our joins are end-of-text.
    tokenizer.encode_special_tokens = True
    ids = [tokenizer.token_to_id(t) for t in BPE_SPECIALS]
    return Encoder(
        encode_batch=lambda texts: [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)],
        vocab_size=tokenizer.get_vocab_size(), eot_id=ids[0], mask_id=ids[1], pad_id=ids[2], special_ids=tuple(ids),
    )


def _save_for_transformers(tokenizer: object, out: Path) -> None:
    """tokenizer.json plus the two small files that make ``AutoTokenizer.from_pretrained(out)`` set eos/mask/pad.

    Written by hand rather than by ``save_pretrained``: the format is stable across transformers
    versions, and training a BPE then needs ``tokenizers`` only.
    """
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    special = {"eos_token": EOT, "mask_token": MASK, "pad_token": PAD}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=1) + "\n")


def load_local(folder: Path) -> Encoder:
    """A local tokenizer folder through ``AutoTokenizer``: eot is its eos token, else (BERT-like) its sep token."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(f"tokenizer folder {folder} needs the transformers package; pip install transformers") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # the user's files: any failure to load them is their error, reported with the reason
        raise UserError(f"transformers.AutoTokenizer could not load the tokenizer folder {folder}: {e}") from None
    eot = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if eot is None:
        raise UserError(f"a tokenizer must have an eos_token (or, BERT-like, a sep_token) to join documents, "
                        f"but the one in {folder} has neither; set eos_token in its tokenizer_config.json")

    def encode(texts: list[str]) -> list[list[int]]:
        # verbose=False: a document longer than model_max_length is fine here, it is cut into windows later.
        return tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                         return_token_type_ids=False, verbose=False)["input_ids"]

    return Encoder(
        encode_batch=encode, vocab_size=len(tokenizer), eot_id=eot, mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id, special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
    )
