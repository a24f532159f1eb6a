"""Parquet and Arrow data, read with the ``datasets`` library: each row's text column is a document.

Local files only and streamed (``streaming=True``): rows are read batch by batch straight
from the files, never converted into a second copy; what ``datasets`` keeps on disk goes to
the build's temporary folder, not the Hugging Face cache.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from cotune.data.info import ProgressFn
from cotune.data.sources import Source, text_value
from cotune.errors import UserError

_BATCH_ROWS = 1024


def table_documents(source: Source, text_field: str, progress: ProgressFn | None, work_dir: Path) -> Iterator[str]:
    """The ``text_field`` column of every row of ``source``'s Parquet or Arrow files, in order."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {source.kind} data needs the datasets package; pip install datasets") from None
    files = [str(f) for f in source.files]
    hf_cache = work_dir / "hf-datasets"  # lock files datasets writes even when streaming; not part of the corpus
    try:
        ds = datasets.load_dataset(source.kind, data_files=files, split="train", streaming=True,
                                   cache_dir=str(hf_cache))
    except Exception as e:  # a user's file that is not what its name says: report, do not crash
        raise UserError(f"datasets could not read the {source.kind} data {source.path}: {e}") from None
    columns = list(ds.features or {}) or ds.column_names
    if columns is not None and text_field not in columns:
        names = ", ".join(repr(c) for c in columns) or "none"
        raise UserError(f"the {source.kind} data {source.path} must have the text column {text_field!r} "
                        f"(workload.data_field), but its columns are {names}")
    total = _parquet_rows(source.files) if source.kind == "parquet" else None
    done = 0
    what = f"reading {source.kind} rows"
    for batch in ds.select_columns([text_field]).iter(batch_size=_BATCH_ROWS):
        for value in batch[text_field]:
            done += 1
            yield text_value(value, f"row {done} of {source.path}", text_field)
        if progress:
            progress(what, done, total)
    shutil.rmtree(hf_cache, ignore_errors=True)


def _parquet_rows(files: tuple[Path, ...]) -> int | None:
    """Rows in all files, from the Parquet footers (cheap); None if pyarrow cannot say."""
    try:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(f).num_rows for f in files)
    except Exception:  # only a progress bar's total: an unreadable footer fails later, with a clear error
        return None
