"""Training data: a user's data and a tokenizer made into cached, packed token files.

Where each thing is decided:

- ``prepare``: :func:`prepare_data`, the cache key and the build (read, split, tokenize);
- ``sources``: what a spec names (file, folder, format) and the document rule of each format;
  ``tables``: Parquet and Arrow through ``datasets``; ``builtin``: the built-in corpus;
- ``documents``: Unicode clean-up and the train/val split by document;
- ``tokenizer``: ``bytes``, ``bpe:<N>`` (trained here) and local tokenizer folders;
- ``nanogpt``: a nanoGPT ``.bin`` used in place;
- ``cache``: content keys and atomic publication; ``info``: :class:`DataInfo` and :func:`open_splits`.

numpy only at import: the search process imports this to learn the vocabulary before any
trial runs, and each trial process again; the tokenizer and data libraries load on a cache miss.
"""

from __future__ import annotations

from cotune.data.builtin import BUILTINS
from cotune.data.info import DataInfo, ProgressFn, default_cache_dir, open_splits, token_dtype
from cotune.data.prepare import FORMAT_VERSION, prepare_data

__all__ = ["BUILTINS", "FORMAT_VERSION", "DataInfo", "ProgressFn", "default_cache_dir", "open_splits",
           "prepare_data", "token_dtype"]
