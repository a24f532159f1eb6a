"""Count what one timed training step asks of the host, as tests/test_parallel.py compares across layouts.

``python tests/probes/host_syncs.py CONFIG.json OUT.json`` (under torchrun for several ranks) builds
the trial's trainer exactly as a trial does, runs two untimed steps, then counts, over
``STEPS`` steps, every host sync (``aten._local_scalar_dense``: ``.item()``, ``float()``,
``.tolist()``) and every collective that goes through PyTorch's dispatcher (DTensor's and
the functional collectives). Rank 0 writes ``{"host_syncs_per_step": ..., "collectives_per_step": ...}``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from cotune.config import TrialConfig
from cotune.data import default_cache_dir
from cotune.trial import distributed
from cotune.trial.train import _load_data, build_trainer

STEPS = 4


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name == "aten._local_scalar_dense" or name.startswith("_c10d_functional.") or name.startswith("c10d."):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    config = TrialConfig.load(sys.argv[1])
    d = distributed.init(config)
    data, train_tokens, _ = _load_data(config, default_cache_dir())
    trainer, _ = build_trainer(config, d, data, train_tokens)
    for _ in range(2):  # allocator growth and lazy initialisation stay out of the count
        trainer.step(1e-3)
    counter = Count()
    with counter:
        for _ in range(STEPS):
            trainer.step(1e-3)
    syncs = counter.ops["aten._local_scalar_dense"]
    collectives = sum(n for op, n in counter.ops.items() if op != "aten._local_scalar_dense")
    if d.rank == 0:
        Path(sys.argv[2]).write_text(json.dumps({"host_syncs_per_step": syncs / STEPS,
                                                 "collectives_per_step": collectives / STEPS,
                                                 "ops": dict(counter.ops)}))
    distributed.shutdown(d)


if __name__ == "__main__":
    main()
