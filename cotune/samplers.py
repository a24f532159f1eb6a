"""The sampler registry: Optuna samplers by name, each a plain callable ``(seed, n_objectives) -> sampler``.

This module imports Optuna only when a sampler is built, so the command line can list the
names without paying for the import.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any


def _tpe(seed: int | None, n_objectives: int) -> Any:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # multivariate, group
        # group=True: conditional parameters (tiles of a Triton kernel, the micro batch per rank batch, a layout
        # per world size) are modelled with the trials that asked for them, not dropped to independent sampling.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)


def _nsga2(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed, population_size=10)


def _gp(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)


def _random(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: dict[str, Callable[[int | None, int], Any]] = {
    "tpe": _tpe,
    "nsga2": _nsga2,
    "gp": _gp,
    "random": _random,
}
DEFAULT = "tpe"
