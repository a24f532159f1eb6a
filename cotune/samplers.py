"""The sampler registry: Optuna samplers by name, each a plain callable ``(seed, n_objectives) -> sampler``.

With a seed, a sampler draws each trial from random state seeded by the seed and the trial's
number (:func:`seeded_per_trial`), not from one stream per process: a study resumed with the
same ``--seed`` does not propose its first trials again, and several workers started together
on one study with the same seed do not propose the same configs. TPE treats the trials other
workers are running as their worst case (``constant_liar``) so it proposes elsewhere; with one
worker nothing is running when it asks, so this changes nothing.

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
        return seeded_per_trial(optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                            n_startup_trials=10, constant_liar=True), seed)


def _nsga2(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return seeded_per_trial(optuna.samplers.NSGAIISampler(seed=seed, population_size=10), seed)


def _gp(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return seeded_per_trial(optuna.samplers.GPSampler(seed=seed, n_startup_trials=10), seed)


def _random(seed: int | None, n_objectives: int) -> Any:
    import optuna

    return seeded_per_trial(optuna.samplers.RandomSampler(seed=seed), seed)


def seeded_per_trial(sampler: Any, seed: int | None) -> Any:
    """``sampler``, its random state (and its fallback sampler's) reseeded from ``seed`` and the trial's number
    before each trial is sampled (Optuna calls ``before_trial`` before any parameter); None: left random."""
    if seed is None:
        return sampler
    before = sampler.before_trial

    def before_trial(study: Any, trial: Any) -> None:
        _seed(sampler, (seed * 1_000_003 + trial.number) % 2**32)
        before(study, trial)

    sampler.before_trial = before_trial
    return sampler


def _seed(sampler: Any, seed: int) -> None:
    # Optuna's samplers keep a LazyRandomState in ``_rng``; TPE and NSGA-II fall back to a random sampler,
    # GP to an independent one, each with its own.
    sampler._rng.rng.seed(seed)
    for name in ("_random_sampler", "_independent_sampler"):
        inner = getattr(sampler, name, None)
        if inner is not None:
            _seed(inner, (seed + 1) % 2**32)


SAMPLERS: dict[str, Callable[[int | None, int], Any]] = {
    "tpe": _tpe,
    "nsga2": _nsga2,
    "gp": _gp,
    "random": _random,
}
DEFAULT = "tpe"
