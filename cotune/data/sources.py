"""What a data spec names (:func:`find_source`) and the documents in it (:func:`read_documents`).

Document rules, per kind of input:

- a text file: documents are separated by the literal ``<|endoftext|>`` if the file holds
  one (the GPT-2 / TinyStories convention), else by blank lines (paragraphs); surrounding
  whitespace is trimmed. Undecodable UTF-8 bytes become U+FFFD.
- a folder of text files (``.txt``, ``.md``, ``.rst``, ``.text``, recursively, sorted, hidden
  files and folders skipped): each file is one document.
- JSON Lines (``.jsonl``, or ``.json`` with one object per line): each record's text field.
- Parquet / Arrow (read by ``datasets``): each row's text column (:mod:`cotune.data.tables`).
- a folder holding ``.jsonl``, ``.parquet`` or ``.arrow`` shards (one format) is read as those
  shards, in sorted order; text files beside them (a README) are ignored, and so are ``.json``
  files (in a dataset folder they are metadata such as ``dataset_info.json``).

A ``null`` text is an empty document (dropped); any other non-string is an error.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cotune.data.builtin import BUILTINS, stdlib_documents, stdlib_label
from cotune.data.cache import CHUNK_BYTES
from cotune.data.info import ProgressFn
from cotune.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SHARD_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}
FIELD_KINDS = ("jsonl", "parquet", "arrow")  # the kinds whose documents are one field of a record
EOT_TEXT = "<|endoftext|>"
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")  # one or more blank (or whitespace-only) lines
_TEXT_CHUNK_CHARS = 1 << 20
_KIND_NAMES = {"text": "text file", "text-folder": "text", "jsonl": "JSON Lines", "parquet": "Parquet",
               "arrow": "Arrow"}


def _valid_data() -> str:
    builtins = ", ".join(f"builtin:{b}" for b in BUILTINS)
    return (f"give a text file, a folder of text files, a JSON Lines (.jsonl) file, a Parquet or Arrow file "
            f"(or a folder of them), a nanoGPT .bin file, or {builtins}")


@dataclass(frozen=True)
class Source:
    """A data spec resolved: its kind and its input files in reading order."""

    spec: str
    kind: str  # builtin | bin | text | text-folder | jsonl | parquet | arrow
    path: Path | None  # the file or folder given; None for a builtin
    files: tuple[Path, ...] = ()

    @property
    def uses_field(self) -> bool:
        return self.kind in FIELD_KINDS

    def key_files(self) -> list[tuple[str, Path]]:
        """(name, path) of every input for the cache key: paths relative to a folder, "" for a single file."""
        if self.path is not None and self.path.is_dir():
            return [(f.relative_to(self.path).as_posix(), f) for f in self.files]
        return [("", f) for f in self.files]

    def label(self, text_field: str) -> str:
        """What the data is, for the one-line ``DataInfo.source``."""
        if self.kind == "builtin":
            return stdlib_label()
        field = f", field {text_field!r}" if self.uses_field else ""
        if self.path is not None and self.path.is_dir():
            return f"folder {self.path} ({len(self.files):,} {_KIND_NAMES[self.kind]} files){field}"
        article = {"text": "", "jsonl": " file", "parquet": " file", "arrow": " file"}[self.kind]
        return f"{_KIND_NAMES[self.kind]}{article} {self.path}{field}"


def find_source(spec: str) -> Source:
    """Resolve ``spec`` (``builtin:NAME`` or a path) to a :class:`Source`; a UserError says what is valid."""
    if spec.startswith("builtin:"):
        if spec.removeprefix("builtin:") not in BUILTINS:
            valid = ", ".join(f"builtin:{b}" for b in BUILTINS)
            raise UserError(f"unknown builtin data set {spec!r}; valid builtins are {valid}")
        return Source(spec, "builtin", None)
    path = Path(spec).expanduser().resolve()
    if path.is_dir():
        return _find_folder(spec, path)
    if not path.is_file():
        raise UserError(f"data {path} does not exist; {_valid_data()}")
    suffix = path.suffix.lower()
    kind = "bin" if suffix == ".bin" else "jsonl" if suffix == ".json" else SHARD_SUFFIXES.get(suffix, "text")
    return Source(spec, kind, path, (path,))


def _find_folder(spec: str, folder: Path) -> Source:
    shards: dict[str, list[Path]] = {}
    texts: list[Path] = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache, ...
        for name in names:
            if name.startswith("."):
                continue
            path = Path(parent) / name
            suffix = path.suffix.lower()
            if suffix in SHARD_SUFFIXES:
                shards.setdefault(SHARD_SUFFIXES[suffix], []).append(path)
            elif suffix in TEXT_SUFFIXES:
                texts.append(path)
    if len(shards) > 1:
        found = ", ".join(f"{len(v)} {k}" for k, v in sorted(shards.items()))
        raise UserError(f"a data folder must hold shards of one format, but {folder} holds {found} files; "
                        "give a folder of one format or one file")
    if shards:
        (kind, files), = shards.items()
        return Source(spec, kind, folder, tuple(sorted(files)))
    if texts:
        return Source(spec, "text-folder", folder, tuple(sorted(texts)))
    raise UserError(f"data folder {folder} holds no {', '.join(TEXT_SUFFIXES)}, .jsonl, .parquet or .arrow files "
                    f"(hidden files are skipped); {_valid_data()}")


def read_documents(source: Source, text_field: str, progress: ProgressFn | None,
                   work_dir: Path) -> Iterator[tuple[str, str | None]]:
    """(document, split key or None) in reading order; None keys split by the document's own text."""
    if source.kind == "builtin":
        yield from stdlib_documents(progress)
    elif source.kind == "text":
        yield from ((doc, None) for doc in _text_file_documents(source.files[0], progress))
    elif source.kind == "text-folder":
        yield from ((doc, None) for doc in _text_folder_documents(source.files, progress))
    elif source.kind == "jsonl":
        yield from ((doc, None) for doc in _jsonl_documents(source.files, text_field, progress))
    else:
        from cotune.data.tables import table_documents

        yield from ((doc, None) for doc in table_documents(source, text_field, progress, work_dir))


def _text_file_documents(path: Path, progress: ProgressFn | None) -> Iterator[str]:
    separator = re.compile(re.escape(EOT_TEXT)) if _contains(path, EOT_TEXT.encode()) else _PARAGRAPH_BREAK
    size = path.stat().st_size
    what = f"reading {path.name}"
    with path.open("rb") as raw:
        # Universal newlines (\r\n and \r become \n) before splitting, so a CRLF file's blank lines count.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline=None)
        carry = ""
        while chunk := text.read(_TEXT_CHUNK_CHARS):
            parts = separator.split(carry + chunk)
            carry = parts.pop()  # may continue in the next chunk (a separator can straddle chunks too)
            yield from (p.strip() for p in parts)
            if progress:
                progress(what, raw.tell(), size)
        yield carry.strip()


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes hold ``needle``; streamed, with an overlap for a needle across chunks."""
    tail = b""
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            if needle in tail + chunk:
                return True
            tail = chunk[-(len(needle) - 1) :]
    return False


def _text_folder_documents(files: tuple[Path, ...], progress: ProgressFn | None) -> Iterator[str]:
    for i, path in enumerate(files):
        with path.open(encoding="utf-8-sig", errors="replace", newline=None) as f:
            yield f.read().strip()
        if progress:
            progress("reading text files", i + 1, len(files))


def _jsonl_documents(files: tuple[Path, ...], text_field: str, progress: ProgressFn | None) -> Iterator[str]:
    total = sum(f.stat().st_size for f in files)
    done = reported = 0
    for path in files:
        with path.open("rb") as f:
            for line_no, line in enumerate(f, 1):
                done += len(line)
                if progress and done - reported >= CHUNK_BYTES // 16:
                    progress("reading JSON Lines", done, total)
                    reported = done
                if line_no == 1:
                    line = line.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
                if not line.strip():
                    continue
                yield _record_text(path, line_no, line, text_field)
    if progress:
        progress("reading JSON Lines", total, total)


def _record_text(path: Path, line_no: int, line: bytes, text_field: str) -> str:
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise UserError(f"each line of a JSON Lines file must be one JSON object, but line {line_no} of "
                        f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise UserError(f"each line of a JSON Lines file must be one JSON object, but line {line_no} of "
                        f"{path} is a {type(record).__name__}")
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:20]) or "none"
        raise UserError(f"every record of a JSON Lines file must have the text field {text_field!r} "
                        f"(workload.data_field), but line {line_no} of {path} has only the fields {keys}")
    return text_value(record[text_field], f"line {line_no} of {path}", text_field)


def text_value(value: object, where: str, text_field: str) -> str:
    """A record's text: a string, "" for None (an empty document, dropped), or a UserError naming ``where``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise UserError(f"the text field {text_field!r} must hold strings, but {where} holds a "
                    f"{type(value).__name__}: {str(value)[:60]!r}")
