"""Confirmation runs: the Pareto configs and the baseline run again with other training seeds.

A search measures each config once, and a front picked from single measurements favours the
configs whose one run was lucky. ``confirm_study`` reruns each distinct Pareto config and the
baseline ``repeats`` times, with the training seed ``original + 1000 * k`` for k = 1..repeats,
and stores the reruns in the study's user attrs under one key per confirmed trial
(``confirm:<trial number>``), so workers confirming different trials never write the same key.
The reruns are not Optuna trials: the sampler never sees them and they spend no search budget.

**The original measurement is not one of the samples.** The front was chosen *because* those
runs looked good, so counting them would pull the mean toward luck (the winner's curse); n is
the number of reruns that finished ok.

The statistics are plain functions (the report uses them on the stored values):
a metric's mean, sample standard deviation and Student-t 95% interval (n - 1 degrees of
freedom); the speedup over the baseline as the ratio of mean throughputs with a delta-method
interval on the log ratio (Welch–Satterthwaite degrees of freedom); two configs are
indistinguishable within noise when their intervals overlap on every objective.

Nothing here imports torch or starts a process: the caller passes ``run_fn`` (the runner).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from cotune import __version__, time_to_loss
from cotune.config import TrialConfig, TrialResult
from cotune.study import distinct_configs, pareto_trials

KEY_PREFIX = "confirm:"
METRICS = ("tokens_per_second", "val_loss", "peak_memory_bytes", "time_to_loss_s")  # the last: with a loss target
DEFAULT_REPEATS = 3
SEED_STRIDE = 1000  # rerun k trains with seed original + SEED_STRIDE * k: never the original's seed
LEVEL = 0.95

RunFn = Callable[[TrialConfig, Path], TrialResult]


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Summary:
    """One metric over the ok reruns: n, mean, sample std (n - 1) and the Student-t interval of the mean.

    With n == 1 there is a mean but no std or interval (NaN); with n == 0 everything is NaN.
    """

    n: int
    mean: float
    std: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.__dict__.items()}


def t_quantile(df: float, level: float = LEVEL) -> float:
    """The two-sided Student-t quantile: P(|T| <= q) = level with ``df`` degrees of freedom (df may be fractional)."""
    from scipy.special import stdtrit  # imported here: `cotune --help` and the report start without it

    return float(stdtrit(df, 0.5 + level / 2))


def summarise(values: Sequence[float], level: float = LEVEL) -> Summary:
    """Mean, sample std and the ``level`` Student-t interval of the mean of ``values``."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Ratio:
    """A ratio of two means with its interval (NaN bounds when either side has fewer than two values)."""

    value: float
    low: float
    high: float


def ratio_interval(a: Summary, b: Summary, level: float = LEVEL) -> Ratio:
    """mean(a) / mean(b) with a ``level`` interval: the delta method on the log ratio.

    Var(log mean) ~ s^2 / (n * mean^2) for each side; the two add (independent runs), the
    degrees of freedom are Welch–Satterthwaite's, and the interval is exp(log r ± t * se),
    so it stays positive and is not symmetric about r.
    """
    if not (a.n and b.n and a.mean > 0 and b.mean > 0):
        return Ratio(math.nan, math.nan, math.nan)
    r = a.mean / b.mean
    if a.n < 2 or b.n < 2:
        return Ratio(r, math.nan, math.nan)
    ua = a.std**2 / (a.n * a.mean**2)
    ub = b.std**2 / (b.n * b.mean**2)
    if ua + ub == 0:
        return Ratio(r, r, r)
    df = (ua + ub) ** 2 / (ua**2 / (a.n - 1) + ub**2 / (b.n - 1))
    spread = t_quantile(df, level) * math.sqrt(ua + ub)
    return Ratio(r, r * math.exp(-spread), r * math.exp(spread))


def overlap(a: Summary, b: Summary) -> bool | None:
    """Do the two intervals share a point? None when either has no interval (fewer than two values)."""
    if any(math.isnan(x) for x in (a.low, a.high, b.low, b.high)):
        return None
    return a.low <= b.high and b.low <= a.high


def indistinguishable(summaries: dict[int, dict[str, Summary]], metrics: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs of trials (a < b) whose intervals overlap on every one of ``metrics``: within noise of each other.

    A pair where some metric has no interval on either side is left out (it cannot be told).
    """
    numbers = sorted(summaries)
    pairs = []
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            verdicts = [overlap(summaries[a][m], summaries[b][m]) for m in metrics]
            if verdicts and all(v is True for v in verdicts):
                pairs.append((a, b))
    return pairs


def rerun_seed(original: int, k: int) -> int:
    """The training seed of rerun ``k`` (1, 2, ...) of a trial that trained with seed ``original``."""
    return original + SEED_STRIDE * k


# --------------------------------------------------------------------------- what the study holds


def key_of(number: int) -> str:
    return f"{KEY_PREFIX}{number}"


def confirmations(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """Every confirmed trial's stored entry (see ``confirm_study``), by trial number."""
    out = {}
    for key, value in study.user_attrs.items():
        if key.startswith(KEY_PREFIX) and isinstance(value, dict):
            out[int(key[len(KEY_PREFIX):])] = value
    return dict(sorted(out.items()))


def summaries_of(entry: dict[str, Any], level: float = LEVEL) -> dict[str, Summary]:
    """Each metric of ``entry``'s reruns that finished ok, summarised."""
    ok = [r for r in entry.get("runs", []) if r.get("status") == "ok"]
    return {m: summarise([r[m] for r in ok if isinstance(r.get(m), (int, float))], level) for m in METRICS}


@dataclass(frozen=True)
class Target:
    """A trial to confirm: its number, why (baseline, Pareto or both) and the config it ran."""

    number: int
    roles: tuple[str, ...]
    config: TrialConfig


def targets(study: optuna.Study) -> tuple[list[Target], list[str]]:
    """(the baseline trial and each distinct Pareto config, baseline first; why any was left out).

    Read from each trial's recorded ``config`` user attr (what ran), never from its Optuna params.
    """
    skipped: list[str] = []
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    baseline = [t for t in trials if t.user_attrs.get("baseline")]
    roles: dict[int, list[str]] = {}
    by_number = {t.number: t for t in trials}
    if baseline and baseline[0].user_attrs.get("status") == "ok":
        roles[baseline[0].number] = ["baseline"]
    elif baseline:
        skipped.append(f"the baseline (trial {baseline[0].number}) ended "
                       f"{baseline[0].user_attrs.get('status', baseline[0].state.name.lower())}, so it is not rerun")
    else:
        skipped.append("the study has no baseline trial (the space declares none, or the search ran --no-baseline)")
    for t in distinct_configs(pareto_trials(study)):
        roles.setdefault(t.number, []).append("pareto")
    out = []
    for number, why in sorted(roles.items(), key=lambda kv: ("baseline" not in kv[1], kv[0])):
        recorded = by_number[number].user_attrs.get("config")
        try:
            config = TrialConfig.from_dict(recorded)
        except (ValueError, TypeError) as e:
            skipped.append(f"trial {number}'s recorded config cannot be run again ({e})")
            continue
        out.append(Target(number, tuple(why), config))
    return out, skipped


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Rerun:
    """One confirmation run about to start (or just finished): which trial, which k, which seed."""

    target: Target
    k: int
    seed: int
    index: int  # 1-based position among the reruns this call makes
    total: int


def planned(study: optuna.Study, found: list[Target], repeats: int) -> list[Rerun]:
    """The reruns still missing, round by round (every target's k = 1, then k = 2, ...).

    Rounds rather than one config at a time, so a drift of the machine over the run (heat,
    another job) spreads over every config instead of landing on one.
    """
    held = confirmations(study)
    todo = []
    for k in range(1, repeats + 1):
        for t in found:
            done = {r.get("k") for r in held.get(t.number, {}).get("runs", [])}
            if k not in done:
                todo.append((t, k))
    return [Rerun(t, k, rerun_seed(t.config.run.seed, k), i + 1, len(todo)) for i, (t, k) in enumerate(todo)]


def confirm_study(
    study: optuna.Study,
    run_fn: RunFn,
    runs_dir: Path,
    repeats: int = DEFAULT_REPEATS,
    *,
    on_start: Callable[[Rerun], None] = lambda r: None,
    on_done: Callable[[Rerun, dict[str, Any]], None] = lambda r, run: None,
) -> tuple[list[Target], list[str]]:
    """Rerun the baseline and the distinct Pareto configs until each holds ``repeats`` reruns.

    A trial that holds them already is not run again, so a second call only fills what is
    missing. Each rerun goes to ``runs_dir/confirm-<trial>-seed<seed>`` and is stored as soon
    as it ends, failures included (status and reason), so an interrupted call resumes.
    Returns the targets and why any trial was left out.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, but got repeats={repeats}")
    found, skipped = targets(study)
    for rerun in planned(study, found, repeats):
        t = rerun.target
        config = replace(t.config, run=replace(t.config.run, seed=rerun.seed, profile=False))
        folder = Path(runs_dir) / f"confirm-{t.number:04d}-seed{rerun.seed}"
        on_start(rerun)
        started = time.monotonic()
        result = run_fn(config, folder)
        target = time_to_loss.target_of(study.user_attrs)  # the study's, so reruns count to the same loss
        reached = time_to_loss.of_result(result, target) if target is not None else None
        if reached is not None:
            result.metrics["time_to_loss_s"] = reached[0]
        run = {"k": rerun.k, "seed": rerun.seed, "status": result.status, "reason": _reason(result),
               "folder": str(folder), "seconds": round(time.monotonic() - started, 2),
               **{m: _finite(result.metrics.get(m)) if result.status == "ok" else None for m in METRICS}}
        _store(study, t, run)
        on_done(rerun, run)
    return found, skipped


def _store(study: optuna.Study, target: Target, run: dict[str, Any]) -> None:
    """Add ``run`` to the trial's entry (read again just before, so another worker's reruns are kept)."""
    entry = dict(study.user_attrs.get(key_of(target.number)) or {})
    runs = [r for r in entry.get("runs", []) if r.get("k") != run["k"]] + [run]
    runs.sort(key=lambda r: r["k"])
    entry = {
        "trial": target.number, "roles": list(target.roles), "original_seed": target.config.run.seed,
        "original_counted": False, "level": LEVEL, "runs": runs, "cotune_version": __version__,
    }
    entry["summary"] = {m: s.to_dict() for m, s in summaries_of(entry).items()}
    study.set_user_attr(key_of(target.number), entry)


def _reason(result: TrialResult) -> str:
    if result.status == "ok":
        return ""
    lines = result.error_tail.strip().splitlines()
    return (result.reason or (lines[-1] if lines else ""))[:500]


def _finite(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None
