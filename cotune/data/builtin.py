"""The built-in corpus: docstrings of the running Python's standard library, one document per file.

Small (4 MB at most), always there, and real English-with-code text: enough for the tiny
models of the CPU spaces. The split is by file (a file's path decides it), so no file's
docstrings are in both splits.
"""

from __future__ import annotations

import ast
import os
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

from cotune.data.info import ProgressFn

BUILTINS = ("stdlib-docstrings",)
STDLIB_MAX_BYTES = 4_000_000  # cap on the corpus: enough for tiny models, quick to gather
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_version() -> str:
    """The running Python, e.g. ``cpython3.11.9``: its standard library is the corpus, so it is in the cache key."""
    return sys.implementation.name + ".".join(map(str, sys.version_info[:3]))


def stdlib_label() -> str:
    version = ".".join(map(str, sys.version_info[:3]))
    return f"docstrings of the Python {version} standard library"


def stdlib_documents(progress: ProgressFn | None) -> Iterator[tuple[str, str]]:
    """(document, split key) per file, in path order: its docstrings joined by blank lines, keyed by its path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = _stdlib_files(root)
    total = 0
    for i, rel in enumerate(paths):
        if progress and i % 100 == 0:
            progress("reading the standard library", i, len(paths))
        docs = _docstrings(root / rel)
        if not docs:
            continue
        text = "\n\n".join(docs)
        yield text, rel
        total += len(text.encode("utf-8", "replace"))
        if total >= STDLIB_MAX_BYTES:
            break
    if progress:
        progress("reading the standard library", len(paths), len(paths))


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
