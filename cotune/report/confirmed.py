"""What the report shows of the confirmation runs (``cotune confirm``), computed before anything is drawn.

Each confirmed trial's reruns are summarised with ``cotune.confirm``'s statistics: per
objective the mean and its Student-t 95% interval over the reruns that finished ok (the
search's own measurement is not counted), the speedup over the baseline with its interval,
and which Pareto configs are indistinguishable within noise (intervals overlapping on every
objective).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import optuna

from cotune.confirm import (
    LEVEL,
    Ratio,
    Summary,
    confirmations,
    indistinguishable,
    ratio_interval,
    summaries_of,
)


@dataclass(frozen=True)
class Confirmed:
    """The confirmation runs of the trials the report shows (the Pareto picks and the baseline)."""

    summaries: dict[int, dict[str, Summary]]  # trial -> metric (tokens_per_second, val_loss, peak_memory_bytes)
    runs: dict[int, list[dict[str, Any]]]  # trial -> its stored reruns (seed, status, reason, metrics)
    baseline: int | None  # the report's baseline trial, when it was confirmed
    speedups: dict[int, Ratio]  # confirmed pick -> mean tokens/s over the baseline's, with its interval
    same_within_noise: list[tuple[int, int]]  # pairs of confirmed picks whose intervals overlap on every objective
    unconfirmed: list[int] = field(default_factory=list)  # picks (and the baseline) without any rerun
    level: float = LEVEL

    def failed(self, number: int) -> list[dict[str, Any]]:
        return [r for r in self.runs.get(number, []) if r.get("status") != "ok"]


def confirmed_info(
    study: optuna.Study, picks: list[int], baseline_trial: int | None, metrics: list[str]
) -> tuple[Confirmed | None, str]:
    """(the confirmation data, a note on what is missing); None when no shown trial was confirmed.

    ``picks`` are the distinct Pareto configs the report lists, ``metrics`` the frame columns
    of the study's objectives.
    """
    held = confirmations(study)
    shown = [*([baseline_trial] if baseline_trial is not None else []), *[n for n in picks if n != baseline_trial]]
    confirmed = [n for n in shown if n in held]
    how = ("Run `cotune confirm` (or `cotune search --confirm`) to rerun the Pareto configs "
           "and the baseline with other seeds: the report then draws each one's mean with its 95% interval, "
           "says which configs are indistinguishable within noise and gives the speedup over the baseline "
           "with its interval.")
    if not confirmed:
        return None, "Each point is a single run of its config, so nothing here says how large the noise is. " + how
    summaries = {n: summaries_of(held[n]) for n in confirmed}
    base = baseline_trial if baseline_trial in summaries else None
    speedups = {}
    if base is not None:
        speedups = {n: ratio_interval(summaries[n]["tokens_per_second"], summaries[base]["tokens_per_second"])
                    for n in confirmed if n != base}
    on_front = {n: summaries[n] for n in confirmed if n in picks}
    unconfirmed = [n for n in shown if n not in held]
    note = ""
    if unconfirmed:
        note = (f"Trial(s) {', '.join(f'#{n}' for n in unconfirmed)} have no confirmation runs (the front moved after "
                "`cotune confirm` ran, or it was interrupted); run it again to fill them in.")
    return Confirmed(
        summaries=summaries, runs={n: list(held[n].get("runs", [])) for n in confirmed}, baseline=base,
        speedups=speedups, same_within_noise=indistinguishable(on_front, metrics), unconfirmed=unconfirmed,
    ), note
