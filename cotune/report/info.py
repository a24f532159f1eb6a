"""Everything the report shows, computed from a study before anything is drawn.

``report_info(study)`` reads the study once into a DataFrame (``frame.trials_frame``)
and derives the Pareto set, knee and extremes, the hypervolume history, knob
importances, the baseline comparison, failures and where the study ran. It never
fails for want of data: what cannot be computed is ``None`` plus a note saying why.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import optuna
import pandas as pd

from cotune.config import STATUSES
from cotune.labels import BEST_LABELS, label
from cotune.report import analysis
from cotune.report.baseline import baseline_knobs, differences, is_baseline
from cotune.report.confirmed import Confirmed, confirmed_info
from cotune.report.frame import trials_frame
from cotune.report.front import knee_trial, pareto_configs
from cotune.report.kernels import kernel_rows
from cotune.space import OBJECTIVES
from cotune.study import config_key, objectives_of, pareto_trials

# Below this many ok trials an importance estimate is noise; say so instead of drawing it.
MIN_TRIALS_FOR_IMPORTANCE = 10
# Hypervolume growth over the last quarter of the trials below which the front counts as flat.
FLAT_GAIN = 0.01


@dataclass(frozen=True)
class Objective:
    name: str  # as in the study's objectives: tokens_per_second | val_loss | peak_memory
    metric: str  # the frame column holding it
    direction: str  # maximize | minimize
    label: str


@dataclass(frozen=True)
class Convergence:
    """How the front improved trial by trial (every counted trial, failed ones included)."""

    kind: str  # "hypervolume" (normalised, several objectives) or "best" (one objective, raw units)
    numbers: list[int]
    values: list[float]
    improved_at: list[int]
    reference: dict[str, float]  # objective -> reference-point value (hypervolume only)
    ideal: dict[str, float]  # objective -> best value seen (hypervolume only)
    verdict: str


@dataclass(frozen=True)
class ReportInfo:
    """The report's data; ``render`` draws it and ``summary`` prints it."""

    study_name: str
    objectives: list[Objective]
    frame: pd.DataFrame  # one row per trial (see trials_frame)
    pareto_numbers: list[int]  # every trial Optuna counts as Pareto-optimal (study.best_trials)
    picks: pd.DataFrame  # one row per distinct Pareto config, fastest first
    knee: int | None
    extremes: dict[str, int]  # objective name -> trial number of its best Pareto point
    convergence: Convergence | None
    importances: pd.DataFrame | None  # index: knob, columns: objective names, each column sums to 1
    tunable: list[str]  # knobs that vary across ok trials
    baseline: dict[str, Any]  # every knob's value as the baseline would run
    baseline_declared: list[str]  # the knobs the space's baseline: names
    baseline_trial: int | None  # an ok trial that ran exactly the baseline config
    status_counts: dict[str, int]
    failures: pd.DataFrame
    fingerprint: dict[str, Any]
    run: dict[str, Any]
    kernels: pd.DataFrame  # distinct Triton kernel timings (cotune.report.kernels), empty without any
    notes: dict[str, str] = field(default_factory=dict)  # section -> what is missing, and why
    confirmed: Confirmed | None = None  # the confirmation runs (cotune confirm) of the picks and the baseline

    @property
    def ok(self) -> pd.DataFrame:
        return self.frame[self.frame["ok"]]

    def objective(self, name: str) -> Objective | None:
        return next((o for o in self.objectives if o.name == name), None)


def _objectives(study: optuna.Study) -> list[Objective]:
    names = objectives_of(study)
    if len(names) != len(study.directions):  # a plain Optuna study: name its objectives by position
        names = list(OBJECTIVES)[: len(study.directions)]
    return [Objective(n, OBJECTIVES[n][0], OBJECTIVES[n][1], label(n)) for n in names]


FP16_SKIP_SHARE = 0.05  # above this share of skipped steps an fp16 trial is flagged


def fp16_skip_note(frame: pd.DataFrame) -> str:
    """The ok fp16 trials that skipped more than FP16_SKIP_SHARE of their steps on overflow, in one sentence."""
    ok = frame[frame["ok"] & frame["fp16_skipped_steps"].notna() & (frame["train_steps"] > 0)]
    share = ok["fp16_skipped_steps"] / ok["train_steps"]
    flagged = share[share > FP16_SKIP_SHARE]
    if flagged.empty:
        return ""
    listed = ", ".join(f"#{n} ({v:.0%})" for n, v in flagged.items())
    return (f"fp16 trials that skipped more than {FP16_SKIP_SHARE:.0%} of their optimizer steps on gradient "
            f"overflow: {listed}. Their loss comes from fewer updates than the budget; the loss scale was still "
            "settling, so compare them with care.")


def report_info(study: optuna.Study) -> ReportInfo:
    """Compute the report's data from a loaded study."""
    objectives = _objectives(study)
    frame = trials_frame(study)
    ok = frame[frame["ok"]]
    notes: dict[str, str] = {}
    pareto_numbers = [t.number for t in pareto_trials(study)]
    if ok.empty:
        notes["pareto"] = ("No trial finished ok, so there is no Pareto front, convergence, importance or pick "
                           "yet; see what failed below.")
    elif len(objectives) == 1:
        notes["pareto"] = (f"This study has a single objective ({objectives[0].label}), so its 'front' is the one "
                           "best trial; throughput and loss of the other trials are shown for context.")

    space = dict(study.user_attrs.get("space") or {})
    base, declared = baseline_knobs(space, *_world_and_vocab(frame, space, study.user_attrs.get("fingerprint")))
    if not base:
        notes["baseline"] = ("The study records no baseline config (the space's baseline:), so there is none "
                             "to compare against.")
    # Compare what ran (after derivation: dp, accumulation, knobs left out filled in), not what was sampled.
    matches = [n for n in frame.index if is_baseline(frame.at[n, "effective"], base, declared)]
    baseline_trial = next((n for n in matches if frame.at[n, "ok"]), None)
    if base and baseline_trial is None:
        notes["baseline"] = (f"The baseline config ran in trial {matches[0]} but ended "
                             f"{frame.at[matches[0], 'status']}, so the speedup over it is not shown." if matches else
                             "No trial ran exactly the space's baseline config, so the speedup over it is not "
                             "measured and not shown; the knobs each pick changes from the baseline are listed.")

    configs = pareto_configs(study)
    # The same knee `cotune export --pick knee` writes (cotune.report.front); one objective has none.
    knee = knee_trial(configs, study.directions).number if configs and len(objectives) > 1 else None
    picks, extremes = _picks(frame, pareto_numbers, [t.number for t in configs], knee, objectives, base,
                             baseline_trial)
    notes["fp16"] = fp16_skip_note(frame)
    confirmed, notes["confirm"] = confirmed_info(study, [int(n) for n in picks["number"]], baseline_trial,
                                                 [o.metric for o in objectives])
    tunable = _tunable(ok)
    importances, notes["importance"] = _importances(study, objectives, tunable, len(ok), ok)
    convergence = _convergence(frame, objectives)
    if convergence is None and not ok.empty:
        notes["convergence"] = "Convergence needs at least one trial with every objective recorded."
    counts = {s: int((frame["status"] == s).sum()) for s in STATUSES}
    for extra in sorted(set(frame["status"]) - set(STATUSES)):  # interrupted, running, ...
        counts[extra] = int((frame["status"] == extra).sum())
    # A trial still running (a search in progress) has not failed; one stopped at a rung has its own section.
    failures = frame[~frame["ok"] & ~frame["status"].isin(["running", "waiting", "pruned"])]
    fingerprint = dict(study.user_attrs.get("fingerprint") or {})
    if not fingerprint and len(frame):
        fingerprint = dict(study.trials[0].user_attrs.get("fingerprint") or {})
    return ReportInfo(
        study_name=study.study_name, objectives=objectives, frame=frame, pareto_numbers=pareto_numbers,
        picks=picks, knee=knee, extremes=extremes, convergence=convergence, importances=importances,
        tunable=tunable, baseline=base, baseline_declared=declared, baseline_trial=baseline_trial,
        status_counts=counts, failures=failures, fingerprint=fingerprint, run=_run(study, frame, space),
        kernels=kernel_rows(frame), confirmed=confirmed,
        notes={k: v for k, v in notes.items() if v},
    )


def _world_and_vocab(frame: pd.DataFrame, space: dict[str, Any], fingerprint: dict | None) -> tuple[int, int]:
    """The processes a trial could use and the vocabulary size, as the search had them."""
    hardware = space.get("hardware") or {}
    gpus = ((fingerprint or {}).get("hardware") or {}).get("gpu_count", 0)
    world = hardware.get("nproc") or (gpus if hardware.get("device") == "cuda" else 1) or 1
    configs = [c for c in frame["config"] if isinstance(c, dict)]
    vocab = configs[0]["workload"]["vocab_size"] if configs else (space.get("workload") or {}).get("vocab_size")
    return int(world), int(vocab) if isinstance(vocab, int) else 256


def _picks(
    frame: pd.DataFrame, pareto_numbers: list[int], config_numbers: list[int], knee: int | None,
    objectives: list[Objective], base: dict[str, Any], baseline_trial: int | None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """One row per distinct Pareto config (``config_numbers``), with its tags, speedup and knobs changed from the
    baseline; and the trial with the best value of each objective among them."""
    columns = ["number", "tokens_per_second", "val_loss", "peak_memory_bytes", "mfu", "speedup", "loss_delta",
               "memory_ratio", "differs", "tags", "repeats"]
    if not config_numbers:
        return pd.DataFrame(columns=columns), {}
    # Repeats of one config (same knob values) are one pick, shown once with a count.
    counts = frame.loc[pareto_numbers, "effective"].map(config_key).value_counts()
    distinct = frame.loc[config_numbers].copy()
    distinct["repeats"] = distinct["effective"].map(lambda k: int(counts.get(config_key(k), 1)))
    values = analysis.as_minimised(distinct[[o.metric for o in objectives]].to_numpy(),
                                   [o.direction for o in objectives])
    extremes = {o.name: int(distinct.index[np.argmin(values[:, i])]) for i, o in enumerate(objectives)}
    tags: dict[int, list[str]] = {n: [] for n in distinct.index}
    if knee is not None:
        tags[knee].append("knee")
    for o in objectives:
        tags[extremes[o.name]].append(BEST_LABELS[o.name] if len(objectives) > 1 else "best")
    distinct["tags"] = [tags[n] for n in distinct.index]
    distinct["differs"] = distinct["effective"].map(lambda k: differences(k, base))
    if baseline_trial is not None:
        b = frame.loc[baseline_trial]
        distinct["speedup"] = distinct["tokens_per_second"] / b["tokens_per_second"]
        distinct["loss_delta"] = distinct["val_loss"] - b["val_loss"]
        distinct["memory_ratio"] = distinct["peak_memory_bytes"] / b["peak_memory_bytes"]
    else:
        distinct["speedup"] = distinct["loss_delta"] = distinct["memory_ratio"] = np.nan
    # Fastest first: along a front, each row gives up throughput for lower loss.
    distinct = distinct.sort_values("tokens_per_second", ascending=False, kind="stable")
    return distinct[columns], extremes


def _tunable(ok: pd.DataFrame) -> list[str]:
    """Knobs of the space whose value (as run) differs across the ok trials, in the space's order."""
    if ok.empty:
        return []
    names = [n for n in ok.iloc[0]["knobs"] if n in ok.iloc[0]["effective"]]
    return [n for n in names if len({repr(k.get(n)) for k in ok["effective"]}) > 1]


def _importances(
    study: optuna.Study, objectives: list[Objective], tunable: list[str], n_ok: int, ok: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame | None, str]:
    """PED-ANOVA importance of each knob for each objective (Optuna's default evaluator).

    Ranked over the knob values as they ran (``effective``), not Optuna's params: those are
    conditional (a ``layout`` per world size, a micro batch per rank batch), so most would be
    missing from some trials. A copy of the ok trials in memory carries the knobs as params.
    """
    if ok is not None and not ok.empty:
        study = _as_ran(study, ok, tunable)
    params = [p for p in tunable if all(p in t.params for t in study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))]
    if n_ok < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Knob importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} ok trials to mean anything; "
                      f"this study has {n_ok}.")
    if not params:
        return None, "No knob takes more than one value across the ok trials, so there is no importance to rank."
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    table = {}
    for i, o in enumerate(objectives):
        # PED-ANOVA ranks what it takes to reach *low* target values: negate a maximised objective.
        sign = -1.0 if o.direction == "maximize" else 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "target given", "normalize is experimental"
            raw = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=params, target=lambda t, i=i, s=sign: s * t.values[i],
                normalize=False,
            )
        total = sum(raw.values())
        table[o.name] = {p: (raw[p] / total if total > 0 else np.nan) for p in params}
    frame = pd.DataFrame(table).reindex(params)
    order = frame.mean(axis=1).sort_values(ascending=False).index
    note = "" if frame.notna().all().all() else (
        "For some objectives no knob separates the best 10% of trials from the rest, so they show no bars.")
    return frame.loc[order], note


def _as_ran(study: optuna.Study, ok: pd.DataFrame, tunable: list[str]) -> optuna.Study:
    """An in-memory study of the ok trials whose params are the ``tunable`` knobs as they ran."""
    knobs = dict((study.user_attrs.get("space") or {}).get("knobs") or {})
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    for name in tunable:
        values = [e.get(name) for e in ok["effective"]]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric and (knobs.get(name) or {}).get("choices") is None:
            log = bool((knobs.get(name) or {}).get("log")) and min(values) > 0
            distributions[name] = optuna.distributions.FloatDistribution(min(values), max(values), log=log)
        else:
            distributions[name] = optuna.distributions.CategoricalDistribution(sorted(set(values), key=repr))
    copy = optuna.create_study(directions=study.directions)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}
    for number, effective in ok["effective"].items():
        trial = by_number.get(int(number))
        if trial is not None:
            copy.add_trial(optuna.trial.create_trial(
                params={n: (float(effective[n]) if isinstance(distributions[n], optuna.distributions.FloatDistribution)
                            else effective[n]) for n in tunable},
                distributions=distributions, values=trial.values))
    return copy


def _convergence(frame: pd.DataFrame, objectives: list[Objective]) -> Convergence | None:
    counted = frame[frame["status"].isin(STATUSES)]
    metrics = [o.metric for o in objectives]
    has_all = counted["ok"] & counted[metrics].notna().all(axis=1)
    if not has_all.any():
        return None
    numbers = [int(n) for n in counted.index]
    if len(objectives) == 1:
        o = objectives[0]
        series = analysis.best_so_far(counted[o.metric].where(has_all).to_numpy(), o.direction)
        reference: dict[str, float] = {}
        ideal: dict[str, float] = {}
        kind = "best"
    else:
        points = analysis.as_minimised(counted.loc[has_all, metrics].to_numpy(), [o.direction for o in objectives])
        ideal_v, reference_v = analysis.reference_box(points)
        history = analysis.hypervolume_history(points, reference_v, ideal_v)
        # Spread over every counted trial: a failed trial keeps the volume before it.
        series = pd.Series(np.nan, index=counted.index)
        series[has_all] = history
        series = series.ffill().fillna(0.0).to_numpy()
        signs = [-1.0 if o.direction == "maximize" else 1.0 for o in objectives]
        reference = {o.name: float(v * s) for o, v, s in zip(objectives, reference_v, signs)}
        ideal = {o.name: float(v * s) for o, v, s in zip(objectives, ideal_v, signs)}
        kind = "hypervolume"
    previous = np.concatenate([[np.nan], series[:-1]])
    improved = [n for n, v, p in zip(numbers, series, previous) if not np.isnan(v) and (np.isnan(p) or v != p)]
    return Convergence(kind, numbers, [float(v) for v in series], improved, reference, ideal,
                       _verdict(numbers, series, improved, kind, objectives[0].direction))


def _verdict(numbers: list[int], series: np.ndarray, improved: list[int], kind: str, direction: str) -> str:
    """One sentence on whether more budget looks worth it, from the last quarter of the trials."""
    n = len(numbers)
    last = f"The front last improved at trial {improved[-1]} of {n} counted trials." if improved else ""
    if n < 8:
        return f"{last} Too few trials ({n}) to tell whether more budget would help.".strip()
    window = max(2, n // 4)
    before, now = series[-window - 1], series[-1]
    if np.isnan(before) or np.isnan(now):
        return last
    if kind == "hypervolume":
        gain = (now - before) / now if now > 0 else 0.0
        change = f"the hypervolume grew {gain:.2%} over the last {window} trials"
    else:
        gain = abs(now - before) / abs(now) if now else 0.0
        change = f"the best value moved {gain:.2%} over the last {window} trials"
    if gain >= FLAT_GAIN:
        return f"{last} Still improving: {change}, so more budget is likely to help."
    return f"{last} Flattening: {change}, so more budget is unlikely to move the front much."


def _run(study: optuna.Study, frame: pd.DataFrame, space: dict[str, Any]) -> dict[str, Any]:
    """Where and how the study ran: space, sampler, trial counts, time, versions seen."""
    started = frame["started"].dropna()
    finished = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    wall = (max(finished) - min(started)).total_seconds() if finished and len(started) else None
    configs = [c for c in frame["config"] if isinstance(c, dict)]
    return {
        "space_path": study.user_attrs.get("space_path"),
        "space_name": space.get("name"),
        "description": space.get("description", ""),
        "sampler": study.user_attrs.get("sampler"),
        "trials": len(frame),
        "counted": int(frame["status"].isin(STATUSES).sum()),
        "wall_s": wall,
        "trial_seconds": float(frame["duration_s"].sum(skipna=True)),
        # A trial's workload holds the shape read off the model (a Hugging Face model's space gives only its config).
        "workload": (configs[0]["workload"] if configs else None) or space.get("workload") or {},
        "trial": space.get("trial") or {},
        "constraints": space.get("constraints") or [],
        "log_knobs": [n for n, d in (space.get("knobs") or {}).items() if d.get("log")],
        # pandas holds a missing string as NaN (a float): keep the strings only.
        "hardware_ids": sorted({h for h in frame["hardware_id"] if isinstance(h, str)}),
        "peak_flops_sources": sorted({s for s in frame["peak_flops_source"] if isinstance(s, str)}),
        "peak_memory_sources": sorted({s for s in frame["peak_memory_source"] if isinstance(s, str)}),
        "cotune_version": study.user_attrs.get("cotune_version"),
        "loss_target": study.user_attrs.get("loss_target"),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
