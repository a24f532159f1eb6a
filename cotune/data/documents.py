"""Documents between reading and tokenizing: Unicode clean-up, the split by document, and a spill file.

Every source yields documents as strings; each is normalised here (NFC, control characters
dropped), empty ones are dropped, and each is assigned to train or val by a stable hash, so
a document (and every exact copy of it) lies wholly in one split. The kept documents go to
one file on disk, because a trained tokenizer reads the train documents before anything is
tokenized and a large corpus need not fit in memory.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

NORMALISATION = "NFC; CRLF to LF; Cc dropped but LF and tab; lone surrogates to U+FFFD"  # in the cache key
VAL_ONE_IN = 10  # ~1 document in 10 is held out for validation

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # category Cc but \t (09) and \n (0a)
_SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates (e.g. from a JSON "\ud800") cannot be UTF-8
_SEPARATOR = b"\0"  # NUL is a control character, so it never occurs inside a normalised document
_READ_BYTES = 1 << 22


def normalise(text: str) -> str:
    """NFC, ``\\r\\n`` to ``\\n``, control characters dropped except newline and tab."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text.replace("\r\n", "\n"))
    return _SURROGATE.sub("\ufffd", text)


class DocumentStore:
    """Normalised documents appended to one file in reading order, with each one's split.

    ``add`` every document inside ``with DocumentStore(path) as store:``, then read them
    back with :meth:`batches` (all, in order) or :meth:`texts` (one split).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")
        self._val = bytearray()  # 1 per held-out document, in order
        self.n_dropped = 0  # empty after normalisation
        # If every document hashes to one split, the one nearest the other split's side moves
        # there: the train document of least crc, or the val document of greatest.
        self._least_train: tuple[int, int] | None = None  # (crc, index)
        self._greatest_val: tuple[int, int] | None = None

    def add(self, text: str, split_key: str | None = None) -> bool:
        """Normalise and keep one document; ``split_key`` (default: the normalised text) decides its split.

        Returns False for a document left empty (or all whitespace) by normalising: it is dropped.
        """
        text = normalise(text)
        if not text.strip():
            self.n_dropped += 1
            return False
        # crc32 is stable between runs and machines, unlike hash(): the same data splits the same way.
        crc = zlib.crc32((text if split_key is None else split_key).encode("utf-8", "replace"))
        index = len(self._val)
        is_val = crc % VAL_ONE_IN == 0
        self._val.append(is_val)
        if is_val and (self._greatest_val is None or crc > self._greatest_val[0]):
            self._greatest_val = (crc, index)
        if not is_val and (self._least_train is None or crc < self._least_train[0]):
            self._least_train = (crc, index)
        self._file.write(text.encode("utf-8") + _SEPARATOR)
        return True

    def __enter__(self) -> DocumentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish writing; with two documents or more, make sure each split holds at least one."""
        if self._file.closed:
            return
        self._file.close()
        n_val = sum(self._val)
        if len(self._val) >= 2 and n_val == 0 and self._least_train is not None:
            self._val[self._least_train[1]] = 1
        elif len(self._val) >= 2 and n_val == len(self._val) and self._greatest_val is not None:
            self._val[self._greatest_val[1]] = 0

    def is_val(self, index: int) -> bool:
        """Whether the ``index``-th kept document is held out (final after :meth:`close`)."""
        return bool(self._val[index])

    @property
    def counts(self) -> tuple[int, int]:
        """(train documents, val documents)."""
        n_val = sum(self._val)
        return len(self._val) - n_val, n_val

    def batches(self, max_chars: int = 1 << 20) -> Iterator[tuple[list[str], list[bool]]]:
        """All documents in order, as (texts, is_val) batches of about ``max_chars`` characters."""
        texts: list[str] = []
        size = 0
        for index, text in enumerate(self._read()):
            texts.append(text)
            size += len(text)
            if size >= max_chars:
                yield texts, [bool(v) for v in self._val[index + 1 - len(texts) : index + 1]]
                texts, size = [], 0
        if texts:
            yield texts, [bool(v) for v in self._val[len(self._val) - len(texts) :]]

    def texts(self, split: str, max_chars: int = 1 << 20) -> Iterator[list[str]]:
        """Batches of one split's documents (``"train"`` or ``"val"``), in order."""
        want = split == "val"
        for texts, is_val in self.batches(max_chars):
            if chosen := [t for t, v in zip(texts, is_val) if v == want]:
                yield chosen

    def _read(self) -> Iterator[str]:
        carry = b""
        with self.path.open("rb") as f:
            while chunk := f.read(_READ_BYTES):
                parts = (carry + chunk).split(_SEPARATOR)
                carry = parts.pop()  # the unfinished last document, or b"" after a separator
                for part in parts:
                    yield part.decode("utf-8")
