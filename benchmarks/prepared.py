"""What every benchmark that runs the search engine needs first, as `cotune search` prepares it.

The space loaded, this machine's fingerprint, the space's data tokenized (cached), the
vocabulary size (``auto``: the data's) and what the search learns of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from cotune import data, hardware, search, workload
from cotune.space import SearchSpace, default_space_path, load_space
from cotune.workload import WorkloadInfo


@dataclass(frozen=True)
class Prepared:
    space: SearchSpace
    space_path: Path
    fingerprint: dict[str, Any]
    cache_dir: Path
    vocab_size: int
    workload: WorkloadInfo

    def settings(self, **kw: Any) -> search.SearchSettings:
        """The search's settings for this space on this machine; ``kw`` sets the rest (budget, runs_dir, ...)."""
        return search.SearchSettings(**{
            "space": self.space, "space_path": str(self.space_path), "objectives": list(self.space.objectives),
            "fingerprint": self.fingerprint, "vocab_size": self.vocab_size, "workload": self.workload,
            "world_size": search.check_hardware(self.space, str(self.space_path), self.fingerprint), **kw})

    def machine(self) -> str:
        hw = self.fingerprint["hardware"]
        return (f"{hw['cpu_model']} x{hw['cpu_count']}, {hw['gpu_count']} GPU(s), "
                f"torch {self.fingerprint['software']['torch']}")


def prepare(space_path: Path | None = None) -> Prepared:
    """Prepare ``space_path`` (default: the shipped space for this machine's GPU count)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fingerprint = hardware.fingerprint()
    space_path = Path(space_path or default_space_path(fingerprint["hardware"]["gpu_count"]))
    space = load_space(space_path)
    cache_dir = data.default_cache_dir()
    w = space.workload
    info = data.prepare_data(w.data, cache_dir, seq_len=w.seq_len, tokenizer=w.tokenizer, text_field=w.data_field)
    vocab = info.vocab_size if w.vocab_size == "auto" else w.vocab_size
    described = workload.describe(w, vocab_size=vocab, eot_id=info.eot_id, pad_id=info.pad_id, cache_dir=cache_dir)
    return Prepared(space, space_path, fingerprint, cache_dir, vocab, described)
