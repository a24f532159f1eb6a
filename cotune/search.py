"""The search engine: an Optuna study driven by ask/tell over real trials.

Each asked trial becomes a TrialConfig (``derive``); an infeasible one is recorded
without launching, as a violated constraint (``Trial.set_constraint``) that the samplers
learn the feasible region from; a feasible one is run by ``run_fn`` (the runner in real
use, a fake in tests) and its TrialResult recorded as user attrs plus the objective
values. A failed run is data: it is told as FAIL and the search goes on. The budget
counts launched trials: infeasible ones are recorded but cost nothing, up to a cap.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from cotune import __version__, derive, early_stop, factorise, hardware, memory, nodes, time_to_loss, workers
from cotune.config import STATUSES, KernelConfig, TrialConfig, TrialResult
from cotune.errors import Terminated, UserError
from cotune.samplers import SAMPLERS
from cotune.space import OBJECTIVES, SearchSpace
from cotune.study import counted_trials, pareto_trials
from cotune.workload import WorkloadInfo

# Runs a config in a folder; with early stopping it also takes ``on_rung`` (see runner.launch_trial).
RunFn = Callable[..., TrialResult]


@dataclass(frozen=True)
class SearchSettings:
    """Everything a search needs besides the study and the function that runs a trial."""

    space: SearchSpace
    space_path: str
    objectives: list[str]
    budget: int
    fingerprint: dict[str, Any]
    vocab_size: int
    runs_dir: Path
    sampler: str = "tpe"
    seed: int | None = None
    profile: bool = False
    artifacts_dir: Path | None = None
    allow_mixed_hardware: bool = False
    world_size: int = 1
    workload: WorkloadInfo | None = None  # what cotune.workload learnt of the model; None: the built-in gpt
    data: dict[str, Any] | None = None  # the prepared data: source, token counts, tokenizer folder
    cache_dir: Path | None = None  # where the peak-FLOP/s probe is cached; None: the study records no MFU peak
    # Infeasible trials one search may record before it stops (they launch nothing, but a space that is
    # almost all infeasible would spin); None: 10 per budgeted trial.
    infeasible_cap: int | None = None
    early_stopping: early_stop.Halving | None = None  # stop trials at loss rungs (MO-ASHA); None: every trial runs its budget
    factorise: bool = False  # run only the throughput or the loss a study has not measured (cotune.factorise)
    job: dict[str, Any] | None = None  # with --jobs: this worker's slot (cotune.jobs.Slot), recorded on its trials

    @property
    def native_precisions(self) -> list[str]:
        return self.fingerprint["native_precisions"].get(self.space.hardware.device, [])


def check_hardware(space: SearchSpace, space_path: str, fingerprint: dict[str, Any]) -> int:
    """The most processes a trial of this space may have (``hardware.nproc`` on each of its ``nnodes``
    machines); a space this machine cannot run is a user error."""
    gpus = fingerprint["hardware"]["gpu_count"]
    if space.hardware.device == "cuda" and gpus == 0:
        raise UserError(
            f"{space_path}: hardware.device is cuda but this machine has no GPU; "
            "use a CPU space such as search_spaces/cpu-tiny-gpt.yaml"
        )
    native = fingerprint["native_precisions"].get(space.hardware.device, [])
    precision = space.knobs.get("precision")
    if precision is not None and not derive.allowed_domain("precision", precision, native).choices:
        raise UserError(
            f"{space_path}: knobs.precision allows {precision.choices}, but this {space.hardware.device} "
            f"runs only {native} natively"
        )
    if space.hardware.device == "cpu":
        return (space.hardware.nproc or 1) * space.hardware.nnodes
    nproc = space.hardware.nproc or gpus
    if nproc > gpus:
        raise UserError(f"{space_path}: hardware.nproc is {nproc} but this machine has {gpus} GPU(s)")
    return nproc * space.hardware.nnodes


def create_or_resume_study(
    storage: optuna.storages.BaseStorage, name: str, settings: SearchSettings, *, baseline: bool = False
) -> optuna.Study:
    """Create the study, or load it and check it is the same search on the same hardware.

    With ``baseline`` a new study's first trial is the space's baseline (:func:`enqueue_baseline`), queued
    before other workers may load the study; why it was not is the study attr ``baseline_not_run``."""
    directions = [OBJECTIVES[o][1] for o in settings.objectives]
    space_json = settings.space.model_dump(mode="json")
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        study_id = None
    # With --seed, each trial is sampled from the seed and its own number (cotune.samplers), so a rerun
    # does not propose the first trials again and workers that share the study propose different ones.
    sampler = SAMPLERS[settings.sampler](settings.seed, len(directions))
    if study_id is not None:
        return _load_created(storage, name, sampler, settings, space_json)
    precision_choices = (derive.allowed_domain("precision", settings.space.knobs["precision"],
                                               settings.native_precisions).choices
                         if "precision" in settings.space.knobs else None)
    peaks = None
    if settings.cache_dir is not None:  # one MFU denominator for the whole study, taken before it exists
        peaks = hardware.study_peak_flops(settings.space.hardware.device,
                                          precision_choices or [derive.DEFAULTS["precision"]], settings.cache_dir)
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:  # another worker created it a moment ago
        return _load_created(storage, name, sampler, settings, space_json)
    attrs = {
        "objectives": settings.objectives,
        "space": space_json,
        "space_path": settings.space_path,
        "sampler": settings.sampler,
        "hardware_id": settings.fingerprint["hardware_id"],
        "fingerprint": settings.fingerprint,
        "workload": settings.workload.to_dict() if settings.workload is not None else None,
        # The precision domain Optuna samples from, for every machine that joins the study later.
        "precision_choices": precision_choices,
        # Peak FLOP/s per precision (datasheet, or the matmul probe): every trial's MFU divides by these.
        "peak_flops": peaks,
        "data": settings.data,
        "cotune_version": __version__,
    }
    if settings.space.loss_target is not None:  # otherwise the baseline's loss, once it is measured
        attrs["loss_target"] = {"value": settings.space.loss_target, "source": "the space's loss_target"}
    version = attrs.pop("cotune_version")  # written last: a worker loading the study waits for it
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    why_not = enqueue_baseline(study, settings) if baseline else ""
    if why_not and settings.space.baseline:
        study.set_user_attr("baseline_not_run", why_not)
    study.set_user_attr("cotune_version", version)
    return study


def load_study(storage: optuna.storages.BaseStorage, name: str, settings: SearchSettings) -> optuna.Study:
    """Join the study another process created (cotune.jobs' workers), with this search's sampler."""
    sampler = SAMPLERS[settings.sampler](settings.seed, len(settings.objectives))
    return _load_created(storage, name, sampler, settings, settings.space.model_dump(mode="json"))


_CREATING_S = 60.0  # how long a worker waits for the study another worker is creating to get its attributes


def _load_created(storage: optuna.storages.BaseStorage, name: str, sampler: Any, settings: SearchSettings,
                  space_json: dict) -> optuna.Study:
    """Load an existing study, once the worker that created it has written its attributes, and check it."""
    deadline = time.monotonic() + _CREATING_S
    while True:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        if "cotune_version" in study.user_attrs or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    _check_compatible(study, name, settings, space_json)
    return study


def _check_compatible(study: optuna.Study, name: str, settings: SearchSettings, space_json: dict) -> None:
    old = study.user_attrs
    if old.get("objectives") != settings.objectives:
        raise UserError(
            f"--objectives {','.join(settings.objectives)} differs from study {name!r}'s "
            f"{','.join(old.get('objectives', []))}; use the same objectives or a new --study"
        )
    if old.get("space") != space_json:
        raise UserError(
            f"--space {settings.space_path} differs from the space study {name!r} was created with "
            f"({old.get('space_path')}); use that space or a new --study"
        )
    here, there = settings.fingerprint["hardware_id"], old.get("hardware_id")
    if there != here and not settings.allow_mixed_hardware:
        raise UserError(
            f"study {name!r} was recorded on other hardware ({_describe(old.get('fingerprint'))}) "
            f"than this machine ({_describe(settings.fingerprint)}); use a new --study, or "
            "--allow-mixed-hardware to mix them"
        )


def _describe(fp: dict[str, Any] | None) -> str:
    if not fp:
        return "unknown"
    hw = fp["hardware"]
    gpus = ", ".join(g["name"] for g in hw["gpus"]) or "no GPU"
    return f"{hw['cpu_model']} x{hw['cpu_count']}, {gpus}"


def enqueue_baseline(study: optuna.Study, settings: SearchSettings) -> str:
    """Queue the space's ``baseline:`` as the next trial of a study that holds none, so every report measures
    its speedup against it. Returns why it was not queued ('' when it was)."""
    declared = settings.space.baseline
    if not declared:
        return "the space declares no baseline"
    if study.get_trials(deepcopy=False):
        return "the study holds trials already"
    # The baseline's knob values, as derive fills what it leaves out; its params are what suggest would ask.
    tiles = {f.name: f.default for f in fields(KernelConfig) if f.name in derive.KNOBS}
    values = {**derive.DEFAULTS, **tiles, "world_size": settings.world_size, **declared}
    world = values["world_size"]
    fsdp, tp, pp = (values[n] for n in derive.DEGREES)
    values["layout"] = derive.layout_name(world // (fsdp * tp * pp), fsdp, tp, pp) \
        if world % (fsdp * tp * pp) == 0 else f"fsdp{fsdp}xtp{tp}xpp{pp} (which does not tile world_size={world})"
    answers = derive.Answers(values)
    ran = derive.suggest(answers, settings.space, settings.native_precisions, study.user_attrs.get("precision_choices"),
                         world_size=settings.world_size, workload=settings.workload)
    if not answers.problem:  # a knob the space fixes is not asked: the baseline must hold its one value
        answers.problem = next((f"its {k}={v!r} is outside what the space's knobs.{k} allow "
                                f"({settings.space.knobs[k].values()})"
                                for k, v in declared.items() if k in ran and ran[k] != v), "")
    if answers.problem:
        return answers.problem
    study.enqueue_trial(answers.params, user_attrs={"baseline": True})
    return ""


@dataclass
class Progress:
    """What the CLI shows after each trial. ``done`` counts launched trials (what the budget counts)."""

    budget: int
    done: int
    started_at: float = field(default_factory=time.monotonic)
    ran_here: int = 0  # trials this search launched
    infeasible_here: int = 0  # trials this search recorded as infeasible (launched nothing)
    by_status: dict[str, int] = field(default_factory=dict)
    pareto_size: int = 0
    best: dict[str, float] = field(default_factory=dict)
    stopped: str = ""  # why the search stopped before the budget ('' when it did not)
    running: int = 0  # launched trials still running, this worker's or others' on the same study

    @property
    def eta_s(self) -> float | None:
        if not self.ran_here:
            return None
        return (time.monotonic() - self.started_at) / self.ran_here * (self.budget - self.done)


def progress_of(study: optuna.Study, objectives: list[str], progress: Progress) -> Progress:
    """Refresh counts, Pareto size and the best value of each objective from the study."""
    every = study.get_trials(deepcopy=False)
    trials = counted_trials(every)
    progress.done = sum(t.user_attrs["status"] != "infeasible" for t in trials)
    progress.by_status = {s: 0 for s in STATUSES}
    for t in trials:
        progress.by_status[t.user_attrs["status"]] += 1
    progress.running = workers.running(every)
    progress.pareto_size = len(pareto_trials(study))
    for i, name in enumerate(objectives):
        values = [t.values[i] for t in trials if t.state == TrialState.COMPLETE]
        if values:
            progress.best[name] = max(values) if OBJECTIVES[name][1] == "maximize" else min(values)
    return progress


def run_search(
    study: optuna.Study,
    settings: SearchSettings,
    run_fn: RunFn,
    *,
    on_start: Callable[[int, TrialConfig | None], None] = lambda n, c: None,
    on_done: Callable[[Progress, TrialResult], None] = lambda p, r: None,
) -> Progress:
    """Ask, run and tell until the study holds ``settings.budget`` launched trials.

    Infeasible trials are recorded without spending the budget; after ``settings.infeasible_cap`` of
    them in this search it stops and says why in ``Progress.stopped``. Whatever goes wrong while a
    trial is in hand (Ctrl-C, or a bug in deriving, estimating or recording) closes that trial before
    the exception goes on, so no trial is left RUNNING.
    """
    progress = progress_of(study, settings.objectives, Progress(settings.budget, 0))
    cap = settings.infeasible_cap if settings.infeasible_cap is not None else 10 * settings.budget
    while True:
        workers.fail_stale_trials(study)  # a dead worker's trial is closed and its config queued again
        trials = study.get_trials(deepcopy=False)
        if workers.launched(trials) >= settings.budget:
            if not workers.running(trials):
                break
            time.sleep(workers.OTHERS_S)  # other workers' last trials: if one's worker dies, its retry is ours
            continue
        time_to_loss.check_loss_target(study, settings.objectives, settings.space_path)
        if progress.infeasible_here >= cap:
            progress.stopped = (
                f"stopped after {progress.infeasible_here} infeasible configs and {progress.ran_here} launched in this "
                f"search: the space is mostly infeasible on this hardware; widen the knobs or loosen its constraints "
                f"(`cotune trials` gives each one's reason)")
            break
        with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": cotune beats it itself
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = workers.ask(study)
        try:
            with workers.Heartbeat(study, trial):
                result = _ask_run_record(study, trial, settings, run_fn, on_start)
        except workers.BudgetSpent as spent:
            _close(study, trial, "interrupted", str(spent))
            break
        except KeyboardInterrupt as e:
            how = "stopped by SIGTERM" if isinstance(e, Terminated) else "interrupted (Ctrl-C)"
            _close(study, trial, "interrupted", f"the search was {how} while this trial ran")
            raise
        except Exception as e:
            # Not the config's failure: recorded as interrupted (not counted), so a rerun tries again.
            _close(study, trial, "interrupted", f"the search failed on this trial: {type(e).__name__}: {e}"[:500])
            raise
        if result.status == "infeasible":
            progress.infeasible_here += 1
        else:
            progress.ran_here += 1
        on_done(progress_of(study, settings.objectives, progress), result)
    return progress


def _ask_run_record(study: optuna.Study, trial: optuna.Trial, settings: SearchSettings, run_fn: RunFn,
                    on_start: Callable[[int, TrialConfig | None], None]) -> TrialResult:
    """One trial: its config derived and checked, run (unless infeasible), and recorded."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("search_pid", os.getpid())
    if settings.job is not None:
        trial.set_user_attr("job", settings.job)
    choices = study.user_attrs.get("precision_choices")  # fixed when the study was created (None: older studies)
    knob_values = derive.suggest(trial, settings.space, settings.native_precisions, choices,
                                 world_size=settings.world_size, workload=settings.workload)
    config, reason = derive.build_config(
        settings.space, knob_values, world_size=settings.world_size, vocab_size=settings.vocab_size,
        seed=trial.number if settings.seed is None else settings.seed, profile=settings.profile,
        shared_memory_bytes=hardware.shared_memory_bytes(settings.fingerprint, settings.space.hardware.device),
        workload=settings.workload,
    )
    if config is not None:
        reason = reason or derive.precision_rule(config.precision.precision, settings.native_precisions)
    if config is not None and config.kernels.selected() and not settings.fingerprint["software"].get("triton"):
        reason = reason or ("kernels=triton needs Triton, which this machine does not have installed "
                            "(pip install 'cotune[kernels]'; CUDA builds of torch bring it)")
    estimate, violation = None, 1.0
    if config is not None and config.workload.model == "gpt":  # the memory model counts the built-in GPT's tensors
        # The analytic memory model, before launch: a config that cannot fit is never run.
        estimate = memory.estimate(config, runtime_bytes=memory.runtime_bytes(settings.fingerprint, config.run.device))
        capacity = memory.capacity_bytes(settings.fingerprint, config.run.device,
                                         config.parallel.world_size // config.run.nnodes)
        if settings.job is not None and config.run.device == "cpu":
            capacity /= settings.job["of"]  # --jobs: the jobs' trials share the host's memory
        too_big = memory.fits(estimate, capacity)
        if too_big and not reason:
            reason, violation = too_big, estimate.total / capacity - 1.0
    measured = None
    if reason:
        on_start(trial.number, config)
        result = TrialResult(status="infeasible", reason=reason)
    else:
        workers.claim_slot(study, trial, settings.budget)
        on_start(trial.number, config)
        config, result, measured = _launch(study, trial, config, settings, run_fn)
    # Feasibility is a constraint the samplers learn from (<= 0: feasible): 1 for a broken rule, the share
    # over capacity for a config the memory model says cannot fit.
    trial.set_constraint("feasible", max(violation, 1e-3) if result.status == "infeasible" else 0.0)
    if estimate is not None:  # recorded beside the measured peak, for every trial
        result.metrics["estimated_peak_memory_bytes"] = estimate.total
    if config is not None:
        _study_mfu(study, config, result)
    if "time_to_loss" in settings.objectives:
        time_to_loss.record_time_to_loss(study, trial, result)
    record(study, trial, config, knob_values, result, settings, estimate, measured)
    return result


def _launch(study: optuna.Study, trial: optuna.Trial, config: TrialConfig, settings: SearchSettings,
            run_fn: RunFn) -> tuple[TrialConfig, TrialResult, dict[str, Any] | None]:
    """Run what the config needs: all of it, or with ``settings.factorise`` only what the study has not
    measured (cotune.factorise). Returns the config the values describe, its result, and where each
    value was measured (None without factorising: all here)."""
    folder = settings.runs_dir / f"trial-{trial.number:04d}"
    listener = None
    if settings.early_stopping is not None:
        config = replace(config, run=replace(config.run, rung_fractions=settings.early_stopping.fractions))
        listener = early_stop.rung_listener(study, trial, settings.objectives, settings.early_stopping.eta)
    if config.run.nnodes > 1:  # node agents join from what the trial records; reuse would run another config
        rendezvous = nodes.new_rendezvous(config.run.nnodes, config.parallel.world_size // config.run.nnodes)
        nodes.announce(trial, config, rendezvous, progress=listener is not None)
        return config, run_fn(config, folder, on_rung=listener, rendezvous=rendezvous), None
    if not settings.factorise:
        return config, run_fn(config, folder, on_rung=listener) if listener else run_fn(config, folder), None
    trials = study.get_trials(deepcopy=False)
    plan = factorise.plan(config, factorise.measured_records(trials))
    by_number = {t.number: t for t in trials}

    def measured_in(number: int) -> TrialResult:
        a = by_number[number].user_attrs
        return TrialResult("ok", metrics=dict(a["metrics"]), loss_curve=list(a["loss_curve"]))

    own = measured_in(plan.throughput_from).metrics if plan.throughput_from is not None else None

    def run(c: TrialConfig) -> TrialResult:
        if listener is None:
            return run_fn(c, folder)
        # A loss trained on another layout is ranked at its rungs with this config's own throughput and memory.
        hear = listener if own is None else (
            lambda r: listener({**r, "metrics": factorise.with_throughput(r["metrics"], own)}))
        return run_fn(c, folder, on_rung=hear)

    result, measured = factorise.run_planned(plan, run, measured_in)
    if plan.run is not None and plan.run != config:
        measured["ran"] = plan.run.to_dict()
    return config, result, measured


def _study_mfu(study: optuna.Study, config: TrialConfig, result: TrialResult) -> None:
    """MFU over the study's peak FLOP/s for the trial's precision, the same figure for every trial.

    On a GPU the peak is one device's, times the trial's devices. On a CPU it was taken on all the
    machine's cores, and a trial's ranks share the cores they may use (``cpu_cores``: all of them, or
    a job's share with --jobs), so the peak counts that share of the machine."""
    peak = (study.user_attrs.get("peak_flops") or {}).get(config.precision.precision)
    m = result.metrics
    if result.status != "ok" or not peak or "flops_per_token" not in m or "tokens_per_second" not in m:
        return
    devices: float = config.parallel.world_size
    cpus = ((study.user_attrs.get("fingerprint") or {}).get("hardware") or {}).get("cpu_count")
    if config.run.device == "cpu" and m.get("cpu_cores") and cpus:
        devices = min(1.0, m["cpu_cores"] / cpus)
    m["peak_flops"] = peak["flops"]
    m["peak_flops_source"] = f"the study's, taken when it was created ({peak['source']})"
    m["mfu"] = m["flops_per_token"] * m["tokens_per_second"] / (peak["flops"] * devices)


def _close(study: optuna.Study, trial: optuna.Trial, status: str, reason: str) -> None:
    """Tell ``trial`` FAIL with ``status`` and ``reason``, unless it was told already (recording got that far)."""
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return
    trial.set_user_attr("status", status)
    trial.set_user_attr("reason", reason)
    study.tell(trial, state=TrialState.FAIL)


def record(
    study: optuna.Study,
    trial: optuna.Trial,
    config: TrialConfig | None,
    knob_values: dict[str, Any],
    result: TrialResult,
    settings: SearchSettings,
    estimate: memory.MemoryEstimate | None = None,
    measured: dict[str, Any] | None = None,
) -> None:
    """Store everything about one trial in the study, then tell its values (or FAIL). ``measured`` says
    which trial measured its throughput and its loss when not all of it ran here (cotune.factorise)."""
    values = None
    if result.status == "ok":
        raw = [result.metrics.get(OBJECTIVES[o][0]) for o in settings.objectives]
        if any(v is None for v in raw):
            missing = [o for o, v in zip(settings.objectives, raw) if v is None]
            result = TrialResult(status="crash", metrics=result.metrics,
                                 reason=f"trial reported no value for objective(s) {missing}")
        else:
            values = [float(v) for v in raw]
    trace_artifact = None
    if result.trace_path and settings.artifacts_dir is not None and Path(result.trace_path).exists():
        store = optuna.artifacts.FileSystemArtifactStore(str(settings.artifacts_dir))
        settings.artifacts_dir.mkdir(parents=True, exist_ok=True)
        trace_artifact = optuna.artifacts.upload_artifact(
            artifact_store=store, file_path=result.trace_path, study_or_trial=trial
        )
    result_dict = result.to_dict()
    attrs = {
        "config": config.to_dict() if config else None,
        "knobs": knob_values,
        "status": result.status,
        "metrics": result_dict["metrics"],
        "loss_curve": result_dict["loss_curve"],
        "phase_seconds": result_dict["phase_seconds"],
        "profile_top_ops": result_dict["profile_top_ops"],
        "kernel_timings": result_dict["kernel_timings"],
        "trace_artifact_id": trace_artifact,
        "error_tail": result.error_tail[-4000:],
        "reason": result.reason,
        "memory_estimate": estimate.to_dict() if estimate is not None else None,
        "measured": measured or {"throughput": "here", "loss": "here"},
        "fingerprint": settings.fingerprint,
        "cotune_version": __version__,
    }
    for key, value in attrs.items():
        trial.set_user_attr(key, json.loads(json.dumps(value)))
    if values is not None:
        study.tell(trial, values=values)
    elif result.status in ("infeasible", "pruned"):
        # Never launched, so no values; PRUNED with its violated constraint is what TPE learns the infeasible
        # region from (it skips FAIL trials altogether). A trial stopped at a rung is PRUNED and feasible.
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, state=TrialState.FAIL)
