"""The ``cotune`` command line: a thin layer over space, search, runner and study.

A user's mistake is a ``UserError``: one sentence on stderr, exit code 2, nothing
written to the study. Everything heavy is imported inside the command that needs it,
so ``cotune --help`` starts fast.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import warnings
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from cotune.errors import Terminated, UserError
from cotune.samplers import DEFAULT as DEFAULT_SAMPLER
from cotune.samplers import SAMPLERS

app = typer.Typer(
    help="Tune LLM training jointly across hardware, software and algorithm, with real measured runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _console(stderr: bool = False) -> Console:
    """Rich console; piped output (logs, CI) gets room for the wide tables instead of 80 columns."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=160 if wide else None)


console = _console()
err_console = _console(stderr=True)


# The --sampler choices are the sampler registry's names (cotune.samplers imports no Optuna).
Sampler = Enum("Sampler", {name: name for name in SAMPLERS}, type=str)


STORAGE_HELP = "Optuna storage URL (SQLite file by default; postgresql://... to scale)."


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _parse_objectives(text: str) -> list[str]:
    from cotune.space import OBJECTIVE_ALIASES, OBJECTIVES

    names = [OBJECTIVE_ALIASES.get(o.strip(), o.strip()) for o in text.split(",") if o.strip()]
    bad = [o for o in names if o not in OBJECTIVES]
    if bad or not names or len(set(names)) != len(names):
        valid = ", ".join([*OBJECTIVES, *OBJECTIVE_ALIASES])
        raise UserError(f"--objectives {text!r} must be a comma-separated list without repeats of: {valid}")
    return names


@app.command()
def search(
    budget: int = typer.Option(50, min=1, help="Total trials the study should hold; a rerun adds only the missing ones."),
    space: Path | None = typer.Option(None, help="Search-space YAML (default: the shipped space for this hardware)."),
    study: str | None = typer.Option(None, help="Study name (default: the space's name)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
    sampler: Sampler = typer.Option(DEFAULT_SAMPLER, help="Optuna sampler."),
    objectives: str | None = typer.Option(
        None, help="Comma-separated: tokens_per_second,val_loss[,peak_memory][,time_to_loss] (default: the space's)."
    ),
    data: str | None = typer.Option(None, help="Training text file or nanoGPT uint16 .bin (default: the space's)."),
    profile: bool = typer.Option(False, help="Add a torch.profiler pass to each trial and store its top ops and trace."),
    seed: int | None = typer.Option(None, help="Sampler and training seed (default: random sampler, trial number as training seed)."),
    runs_dir: Path = typer.Option(Path("cotune-runs"), help="Where each trial's folder (config, result, log) goes."),
    allow_mixed_hardware: bool = typer.Option(False, help="Let a study hold trials from different machines."),
    report: bool = typer.Option(False, "--report", help="Write the HTML report (reports/<study>.html) when the search ends."),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                  help="Run the space's baseline: config as a new study's first trial (default)."),
    confirm: bool = typer.Option(False, "--confirm", help="When the search ends, rerun the Pareto configs and the "
                                 "baseline with other seeds (as `cotune confirm` does), before any --report."),
    dead_after: int = typer.Option(60, "--dead-after", min=2, metavar="SECONDS",
                                   help="A worker whose running trial sent no heartbeat for this long is dead: any "
                                   "worker closes that trial as interrupted and queues its config again, once."),
    warm_start: bool = typer.Option(True, "--warm-start/--no-warm-start",
                                    help="Fork trials from a server that imported torch once (default; a multi-process "
                                    "trial runs torchrun there with its ranks forked), rather than start each in a "
                                    "fresh interpreter."),
    early_stopping: bool = typer.Option(True, "--early-stopping/--no-early-stopping",
                                        help="Stop a trial at 1/9 or 1/3 of its token budget unless it ranks in the "
                                        "top third, by Pareto rank with its loss there, of the trials that got that "
                                        "far (default); it is recorded as pruned, never on the front."),
    jobs: int = typer.Option(1, "--jobs", min=1, metavar="N",
                             help="Run N trials at once, each on its own CPU cores (and GPUs on a GPU machine), as N "
                             "workers of the same study."),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse",
                               help="Measure only what the study has not (default): a config whose throughput or "
                               "fp32 loss an equivalent trial measured runs only the other part, and a new loss "
                               "trains on the layout whose whole trial was quickest for its batch; each reused value "
                               "names its trial."),
) -> None:
    """Run real, measured training trials until the study holds BUDGET of them."""
    _quiet_optuna()
    from cotune import data as data_mod
    from cotune import hardware, runner, workers
    from cotune import search as engine
    from cotune.early_stop import Halving
    from cotune.space import default_space_path, load_space
    from cotune.study import check_storage_url, open_storage, shown

    # Cheap checks of the user's flags and files first; the hardware probe takes seconds.
    objective_names = _parse_objectives(objectives) if objectives else None
    search_space = load_space(space) if space else None
    check_storage_url(storage)
    with console.status("probing hardware"):
        fingerprint = hardware.fingerprint()
    space_path = space or default_space_path(fingerprint["hardware"]["gpu_count"])
    search_space = search_space or load_space(space_path)
    if data is not None:
        search_space = search_space.model_copy(update={"workload": search_space.workload.model_copy(update={"data": data})})
    objective_names = objective_names or list(search_space.objectives)
    if "time_to_loss" in objective_names and search_space.loss_target is None and not search_space.baseline:
        raise UserError(f"{space_path}: the time_to_loss objective needs a target loss; set loss_target: in the "
                        "space, or give it a baseline: whose validation loss becomes the target")
    world_size = engine.check_hardware(search_space, str(space_path), fingerprint)
    from cotune import jobs as jobs_mod

    if jobs > 1 and search_space.hardware.nnodes > 1:
        raise UserError(f"--jobs {jobs}: {space_path} has hardware.nnodes {search_space.hardware.nnodes}, and trials "
                        "across machines run one at a time (their node agents take one trial each); use --jobs 1")
    slots = jobs_mod.slots(jobs, search_space.hardware.device, world_size, fingerprint["hardware"]["gpu_count"]) \
        if jobs > 1 else []
    cache_dir = data_mod.default_cache_dir()
    data_info = _prepare_data(search_space.workload, cache_dir)
    vocab = search_space.workload.vocab_size
    if vocab == "auto":
        vocab = data_info.vocab_size
    elif data_info.vocab_size > vocab:
        raise UserError(
            f"{space_path}: workload.vocab_size is {vocab} but the data {search_space.workload.data} "
            f"has token ids up to {data_info.vocab_size - 1}; set vocab_size: auto or at least {data_info.vocab_size}"
        )
    workload_info = _describe_workload(search_space.workload, vocab, data_info, cache_dir, str(space_path))
    name = study or search_space.name
    settings = engine.SearchSettings(
        space=search_space, space_path=str(space_path), objectives=objective_names, budget=budget,
        fingerprint=fingerprint, vocab_size=vocab, runs_dir=runs_dir / name, sampler=sampler.value, seed=seed,
        profile=profile, artifacts_dir=Path("cotune-artifacts") / name, allow_mixed_hardware=allow_mixed_hardware,
        world_size=world_size, workload=workload_info, data=_data_attrs(data_info), cache_dir=cache_dir,
        early_stopping=Halving() if early_stopping else None, factorise=reuse,
    )
    opt_study = engine.create_or_resume_study(
        open_storage(storage, dead_after_s=dead_after), name, settings,
        baseline=baseline)
    if baseline:
        from optuna.trial import TrialState

        if any(t.user_attrs.get("baseline") for t in opt_study.get_trials(states=(TrialState.WAITING,))):
            console.print("trial 0 runs the space's baseline config, so the report measures every config against it")
        elif opt_study.user_attrs.get("baseline_not_run") and not opt_study.get_trials(deepcopy=False):
            console.print(f"the space's baseline is not run: {opt_study.user_attrs['baseline_not_run']}")
    stale = workers.fail_stale_trials(opt_study)
    if stale:
        console.print(f"closed {stale} trial(s) left running by a search that died, and queued each launched one "
                      "again")
    progress = engine.progress_of(opt_study, objective_names, engine.Progress(budget, 0))
    if progress.done >= budget:
        console.print(
            f"study {name!r} already holds {progress.done} launched trials, the budget of {budget} is spent; "
            f"raise --budget to add more (e.g. --budget {progress.done + 10})"
        )
        _finish(opt_study, objective_names, settings, cache_dir, confirm, report, warm_start)
        return
    console.print(
        f"study [bold]{name}[/] in {shown(storage)}: {progress.done} launched trials so far, running {budget - progress.done} more "
        f"(space {space_path}, sampler {sampler.value}, objectives {', '.join(objective_names)})"
    )

    if slots:
        console.print(f"{jobs} trials at once: {jobs_mod.describe(slots)}")
        requests = [jobs_mod.WorkerRequest(settings, storage, name, dead_after, warm_start, cache_dir, slot)
                    for slot in slots]
        _run_jobs(opt_study, settings, requests)
        _finish(opt_study, objective_names, settings, cache_dir, confirm, report, warm_start)
        return
    fork_server = runner.ForkServer(settings.runs_dir / "fork-server.log") if warm_start else None
    run_fn = runner.search_launcher(settings.runs_dir, cache_dir=cache_dir, trace=profile, fork_server=fork_server)
    previous = signal.signal(signal.SIGTERM, _terminate)  # a scheduler's SIGTERM unwinds as Ctrl-C does
    try:
        _run_with_progress(opt_study, settings, run_fn)
    except _storage_errors() as e:
        from cotune.study import lost_database

        err_console.print(f"error: {lost_database(storage, dead_after, e)}", markup=False, highlight=False)
        raise typer.Exit(1) from None
    except Terminated:
        err_console.print("terminated (SIGTERM): the running trial was killed and recorded as interrupted; "
                          "run the same command again to resume")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: the running trial was killed and recorded as interrupted; "
                          "run the same command again to resume")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        if fork_server is not None:
            fork_server.close()
    _finish(opt_study, objective_names, settings, cache_dir, confirm, report, warm_start)


def _storage_errors() -> tuple[type[BaseException], ...]:  # imported late: optuna and sqlalchemy are slow
    import optuna
    import sqlalchemy.exc

    return (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)


def _finish(opt_study, objective_names, settings, cache_dir: Path, confirm: bool, report: bool,
            warm_start: bool) -> None:
    _print_pareto(opt_study, objective_names)
    if confirm:
        _confirm(opt_study, None, settings.runs_dir, cache_dir, warm_start)
    if report:
        _write_report(opt_study, None)


def _prepare_data(workload, cache_dir: Path):
    """The space's data, tokenized and cached; the first preparation shows a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cotune import data as data_mod

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    tasks: dict[str, int] = {}

    def progress(what: str, done: int, total: int | None) -> None:
        if what not in tasks:
            tasks[what] = bar.add_task(what, total=total)
        bar.update(tasks[what], completed=done, total=total)

    with bar:
        return data_mod.prepare_data(workload.data, cache_dir, seq_len=workload.seq_len, tokenizer=workload.tokenizer,
                                     text_field=workload.data_field, progress=progress)


def _data_attrs(info) -> dict:
    """What the study records of its data: where it came from, its size, and the tokenizer to reuse."""
    return {"source": info.source, "vocab_size": info.vocab_size, "train_tokens": info.n_train_tokens,
            "val_tokens": info.n_val_tokens, "tokenizer_dir": str(info.tokenizer_dir) if info.tokenizer_dir else None}


def _describe_workload(workload, vocab: int, data_info, cache_dir: Path, where: str):
    """What the search needs to know of the model (built once on the meta device in a child process)."""
    from cotune import workload as workload_mod

    if workload.model == "gpt":
        return workload_mod.describe(workload, vocab_size=vocab)
    with console.status(f"building {workload.model} on the meta device to read its layers and plans"):
        try:
            return workload_mod.describe(workload, vocab_size=vocab, eot_id=data_info.eot_id, pad_id=data_info.pad_id,
                                         cache_dir=cache_dir)
        except UserError as e:
            raise UserError(f"{where}: {e}") from None


def _terminate(signum, frame) -> None:
    raise Terminated()


def _run_with_progress(opt_study, settings, run_fn) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cotune import display
    from cotune import search as engine

    bar = Progress(
        TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA {task.fields[eta]}"), TextColumn("{task.fields[stats]}"),
        console=console, transient=False,
    )
    first = engine.progress_of(opt_study, settings.objectives, engine.Progress(settings.budget, 0))
    task = bar.add_task("search", total=settings.budget, completed=first.done, eta="-", stats=_stats(first))

    current = {"number": -1}

    def on_start(number, config):
        current["number"] = number

    def on_done(p, result):
        bar.console.print(display.result_line(current["number"], result))
        eta = "-" if p.eta_s is None else time.strftime("%M:%S", time.gmtime(p.eta_s))
        bar.update(task, completed=p.done, eta=eta, stats=_stats(p))

    with bar:
        progress = engine.run_search(opt_study, settings, run_fn, on_start=on_start, on_done=on_done)
    if progress.stopped:
        err_console.print(f"warning: {progress.stopped}", markup=False, highlight=False)


def _run_jobs(opt_study, settings, requests) -> None:
    """Run the search as one worker per job (cotune.jobs): their trials' lines as they end, one progress bar
    read from the study. A worker's user error, SIGTERM or Ctrl-C ends the search as it would end one worker."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cotune import jobs as jobs_mod
    from cotune import search as engine

    bar = Progress(TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[stats]}"), console=console, transient=False)
    progress = engine.progress_of(opt_study, settings.objectives, engine.Progress(settings.budget, 0))
    task = bar.add_task("search", total=settings.budget, completed=progress.done, stats=_stats(progress))
    errors: list[str] = []

    def on_line(index: int, line: str) -> None:
        if line.startswith("error: "):  # said once, by this search, when the jobs have ended
            errors.append(line.removeprefix("error: "))
            return
        bar.console.print(f"job {index + 1} · {line}")

    procs: list = []
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with bar:
            procs = jobs_mod.start_workers(requests, on_line)
            while any(p.poll() is None for p in procs):
                time.sleep(0.5)
                progress = engine.progress_of(opt_study, settings.objectives, progress)
                bar.update(task, completed=progress.done, stats=_stats(progress))
    except Terminated:
        jobs_mod.stop_workers(procs, signal.SIGTERM)
        err_console.print("terminated (SIGTERM): the running trials were killed and recorded as interrupted; "
                          "run the same command again to resume")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        jobs_mod.stop_workers(procs, signal.SIGINT)
        err_console.print("interrupted: the running trials were killed and recorded as interrupted; "
                          "run the same command again to resume")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    codes = [p.wait() for p in procs]
    if errors:
        raise UserError(errors[0])
    failed = [(k + 1, c) for k, c in enumerate(codes) if c != 0]
    if failed:
        err_console.print(f"error: job {failed[0][0]} ended with exit code {failed[0][1]} (its output is above); "
                          "run the same command again to resume", markup=False, highlight=False)
        raise typer.Exit(1)


def _stats(p) -> str:
    from cotune.display import fmt
    from cotune.labels import label

    failed = ", ".join(f"{k} {v}" for k, v in p.by_status.items() if k not in ("ok", "infeasible", "pruned") and v)
    pruned = p.by_status.get("pruned", 0)
    best = "  ".join(f"best {label(k)} {fmt(v)}" for k, v in p.best.items())
    infeasible = p.by_status.get("infeasible", 0)
    return f"ok {p.by_status.get('ok', 0)}" + (f" | running {p.running}" if p.running else "") + \
        (f" | stopped early {pruned}" if pruned else "") + \
        (f" | failed: {failed}" if failed else "") + \
        (f" | infeasible {infeasible} (not launched)" if infeasible else "") + \
        f" | pareto {p.pareto_size} | {best}"


def _print_pareto(opt_study, objective_names) -> None:
    from cotune import display
    from cotune.study import distinct_configs, pareto_trials, rows

    front = rows(distinct_configs(pareto_trials(opt_study)))
    # Fastest first: along a front, each row gives up throughput for lower loss.
    front.sort(key=lambda r: -(r.metrics.get("tokens_per_second") or 0.0))
    if not front:
        console.print("no trial finished ok yet, so there is no Pareto set")
        return
    table, shared = display.pareto_table(front, f"Pareto set of {opt_study.study_name}: {len(front)} configs "
                                                 f"({', '.join(objective_names)})")
    console.print(table)
    console.print(display.shared_line(shared))


@app.command()
def trials(
    study: str | None = typer.Option(None, help="Study name (default: the storage's only study)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
) -> None:
    """Table of every trial in a study: status, metrics and the knobs that vary."""
    _quiet_optuna()
    from cotune import display
    from cotune.study import load_study, rows

    opt_study = load_study(storage, study)
    all_trials = sorted(opt_study.get_trials(deepcopy=False), key=lambda t: t.number)
    table_rows = rows(all_trials)
    console.print(display.trials_table(table_rows, f"{opt_study.study_name}: {len(all_trials)} trials"))
    for line in display.failure_lines(table_rows):
        console.print(line, markup=False, highlight=False)


@app.command()
def best(
    study: str | None = typer.Option(None, help="Study name (default: the storage's only study)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
) -> None:
    """The Pareto set: one row per distinct config, the knobs that differ highlighted."""
    _quiet_optuna()
    from cotune.study import load_study, objectives_of

    opt_study = load_study(storage, study)
    _print_pareto(opt_study, objectives_of(opt_study))


@app.command("report")
def report_cmd(
    study: str | None = typer.Option(None, help="Study name (default: the storage's only study)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
    output: Path | None = typer.Option(None, "-o", "--output", help="HTML file to write (default: reports/<study>.html)."),
    summary: bool = typer.Option(False, "--summary", help="Print the key table in the terminal; write HTML only if -o is given too."),
) -> None:
    """Write the study's report: one self-contained HTML file that opens offline."""
    _quiet_optuna()
    from cotune.study import load_study

    opt_study = load_study(storage, study)
    if summary:
        from cotune.report import report_info
        from cotune.report.summary import print_summary

        info = report_info(opt_study)
        print_summary(info, console)
        if output is not None:
            _write_report(opt_study, output, info)
        return
    _write_report(opt_study, output)


def _write_report(opt_study, output: Path | None, info=None) -> None:
    """Compute (unless given) and write the HTML report; the default path is reports/<study>.html."""
    import re

    from cotune.report import report_info
    from cotune.report.render import write_report

    info = info if info is not None else report_info(opt_study)
    # A study name may hold characters a file name should not (a slash would make a folder).
    path = output or Path("reports") / (re.sub(r"[^\w.-]+", "_", opt_study.study_name) + ".html")
    write_report(info, path)
    console.print(f"report written to {_short(path.resolve())} ({len(info.picks)} Pareto configs, "
                  f"{len(info.frame)} trials); open it in a browser, it needs no network")


@app.command("confirm")
def confirm_cmd(
    repeats: int = typer.Option(3, min=1, help="Reruns per config, each with another training seed (the search's "
                                "own run is not counted)."),
    study: str | None = typer.Option(None, help="Study name (default: the storage's only study)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
    runs_dir: Path = typer.Option(Path("cotune-runs"), help="Where each rerun's folder goes "
                                  "(<runs-dir>/<study>/confirm-<trial>-seed<seed>)."),
    report: bool = typer.Option(False, "--report", help="Write the HTML report (reports/<study>.html) afterwards."),
    allow_mixed_hardware: bool = typer.Option(False, help="Rerun on a machine other than the study's."),
    warm_start: bool = typer.Option(True, "--warm-start/--no-warm-start",
                                    help="Fork reruns from a server that imported torch once, as the search forks its "
                                    "trials (default), rather than start each in a fresh interpreter."),
) -> None:
    """Rerun the Pareto configs and the baseline with other seeds: mean and spread of each objective.

    Reruns are stored in the study (not as trials: they spend no budget); a trial that holds
    REPEATS of them already is not run again, so running this again only fills what is missing.
    """
    _quiet_optuna()
    from cotune import hardware
    from cotune.study import load_study

    opt_study = load_study(storage, study)
    with console.status("probing hardware"):
        here = hardware.fingerprint()
    there = opt_study.user_attrs.get("hardware_id")
    if there and there != here["hardware_id"] and not allow_mixed_hardware:
        raise UserError(f"study {opt_study.study_name!r} was recorded on other hardware ({there}) than this machine "
                        f"({here['hardware_id']}), so its reruns would measure another machine; confirm it where it "
                        "ran, or pass --allow-mixed-hardware")
    from cotune.data import default_cache_dir

    _confirm(opt_study, repeats, runs_dir / opt_study.study_name, default_cache_dir(), warm_start)
    if report:
        _write_report(opt_study, None)


def _confirm(opt_study, repeats: int | None, runs_dir: Path, cache_dir: Path, warm_start: bool) -> None:
    """Rerun the baseline and the Pareto configs (cotune.confirm), one line per rerun, then their means; with
    ``warm_start`` each rerun is forked from a fork server (``<runs_dir>/fork-server.log``), as search trials are."""
    from cotune import confirm as confirming
    from cotune import runner

    repeats = repeats or confirming.DEFAULT_REPEATS
    found, skipped = confirming.targets(opt_study)
    for why in skipped:
        console.print(f"not confirmed: {why}", markup=False, highlight=False)
    if not found:
        console.print("nothing to confirm: the study has no ok baseline or Pareto trial yet")
        return
    todo = confirming.planned(opt_study, found, repeats)
    listed = ", ".join(f"#{t.number} ({'+'.join(t.roles)})" for t in found)
    if not todo:
        console.print(f"confirmation runs: {listed} hold {repeats} reruns each already; nothing to run "
                      f"(raise --repeats for more)")
    else:
        console.print(f"confirmation runs: {len(todo)} reruns of {listed}, up to {repeats} each, seeds the "
                      f"original + {confirming.SEED_STRIDE}·k; folders in {_short(runs_dir.resolve())}")
        _prepare_data(found[0].config.workload, cache_dir)

    fork_server = runner.ForkServer(runs_dir / "fork-server.log") if warm_start and todo else None
    run_fn = runner.search_launcher(runs_dir, cache_dir=cache_dir, trace=False, fork_server=fork_server)

    def on_done(r, run) -> None:
        head = f"confirm [{r.index}/{r.total}] trial {r.target.number:>3} seed {r.seed:<6}"
        if run["status"] == "ok":
            console.print(f"{head} [green]ok[/]  {_num(run['tokens_per_second'], ',.0f')} tok/s  val loss "
                          f"{_num(run['val_loss'], '.4f')}  peak {_num(run['peak_memory_bytes'], ',.0f', 2**20)}M  "
                          f"({run['seconds']:.1f} s)")
        else:
            console.print(f"{head} [red]{run['status']}[/] {run['reason'][:160]}")

    try:
        confirming.confirm_study(opt_study, run_fn, runs_dir, repeats, on_done=on_done)
    except KeyboardInterrupt:
        err_console.print("interrupted: the running rerun was killed; finished reruns are kept, run "
                          "`cotune confirm` again to add the missing ones")
        raise typer.Exit(130) from None
    finally:
        if fork_server is not None:
            fork_server.close()
    _print_confirmed(opt_study, found)


def _num(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def _print_confirmed(opt_study, found) -> None:
    """Each confirmed trial's mean ± 95% interval, and its throughput over the baseline's."""
    from rich.table import Table

    from cotune import confirm as confirming

    held = confirming.confirmations(opt_study)
    stats = {t.number: confirming.summaries_of(held[t.number]) for t in found if t.number in held}
    base = next((t.number for t in found if "baseline" in t.roles), None)
    table = Table(title=f"confirmation runs of {opt_study.study_name}: mean ± 95% interval over the reruns "
                        "(the search's own run not counted)", header_style="bold")
    from cotune.labels import label

    metrics = [label(m) for m in ("tokens_per_second", "val_loss", "peak_memory_bytes")]
    for header in ("#", "role", "n ok", *metrics, "speedup vs baseline"):
        table.add_column(header, justify="left" if header == "role" else "right")

    def shown(s, spec: str, scale: float = 1.0) -> str:
        if s.n == 0:
            return "–"
        mean = format(s.mean / scale, spec)
        return mean if s.n < 2 else f"{mean} ± {format(s.half_width / scale, spec)}"

    for t in found:
        if t.number not in stats:
            continue
        s = stats[t.number]
        runs = held[t.number]["runs"]
        speedup = "–"
        if base is not None and base in stats and t.number != base:
            r = confirming.ratio_interval(s["tokens_per_second"], stats[base]["tokens_per_second"])
            speedup = "–" if r.value != r.value else f"{r.value:.2f}×" + (
                "" if r.low != r.low else f" ({r.low:.2f}–{r.high:.2f})")
        table.add_row(str(t.number), "+".join(t.roles), f"{sum(r['status'] == 'ok' for r in runs)}/{len(runs)}",
                      shown(s["tokens_per_second"], ",.0f"), shown(s["val_loss"], ".4f"),
                      shown(s["peak_memory_bytes"], ",.0f", 2**20), speedup)
    console.print(table)


@app.command("trial")
def trial_cmd(
    config_path: Path = typer.Argument(..., metavar="CONFIG.json", help="A TrialConfig JSON (as in a trial folder)."),
    out: Path | None = typer.Option(None, help="Trial folder (default: cotune-runs/manual/<time>)."),
    profile: bool = typer.Option(False, help="Add a torch.profiler pass."),
) -> None:
    """Run one config by hand and print its metrics."""
    from dataclasses import replace

    from cotune import data as data_mod
    from cotune import display, runner
    from cotune.config import TrialConfig

    try:
        config = TrialConfig.from_dict(json.loads(config_path.read_text()))
    except FileNotFoundError:
        raise UserError(f"{config_path}: no such config file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, TypeError) as e:
        raise UserError(f"{config_path}: {e}") from None
    if profile:
        config = replace(config, run=replace(config.run, profile=True))
    trial_dir = out or Path("cotune-runs") / "manual" / time.strftime("%Y%m%d-%H%M%S")
    cache_dir = data_mod.default_cache_dir()
    _prepare_data(config.workload, cache_dir)
    with console.status(f"running trial in {trial_dir}"):
        result = runner.launch_trial(config, trial_dir, cache_dir=cache_dir, trace=profile)
    console.print(display.metrics_table(result))
    if result.status != "ok":
        console.print(f"[red]{result.status}[/]: {result.reason}")
        if result.error_tail:
            console.print(result.error_tail, markup=False, highlight=False)
        raise typer.Exit(1)
    console.print(f"trial folder: {trial_dir}")


@app.command("node")
def node_cmd(
    rank: int = typer.Option(..., "--rank", min=1, metavar="R",
                             help="This machine's place among a trial's machines: 1 for the second, 2 for the third, "
                             "... (under SLURM, $SLURM_NODEID); the search's machine is 0."),
    study: str = typer.Option(..., help="The study whose trials to join (it may not exist yet)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
    runs_dir: Path = typer.Option(Path("cotune-runs"), help="Where this machine's share of each trial logs "
                                  "(<runs-dir>/<study>/trial-NNNN/node-R/)."),
) -> None:
    """Run this machine's share of a study's trials that span machines (hardware.nnodes), until stopped."""
    import socket

    import optuna

    from cotune import data as data_mod
    from cotune import nodes
    from cotune.study import check_storage_url, open_storage, shown, study_names

    _quiet_optuna()
    check_storage_url(storage)
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    waited = False
    while True:  # started beside the search: its study may not exist yet
        missing_file = url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists()
        if not missing_file:
            opened = open_storage(storage)
            if study in study_names(opened):
                break
        if not waited:
            console.print(f"waiting for study {study!r} in {shown(storage)} to be created")
            waited = True
        time.sleep(1.0)
    opt_study = optuna.load_study(study_name=study, storage=opened)
    console.print(f"node agent {rank} on {socket.gethostname()}: joining study {study!r}'s trials that span more "
                  f"than {rank} machine(s); Ctrl-C to stop")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        nodes.serve(opt_study, rank, runs_dir / study, data_mod.default_cache_dir(),
                    lambda line: console.print(line, markup=False, highlight=False))
    except Terminated:
        err_console.print("terminated (SIGTERM): this machine's share of the running trial was killed")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err_console.print("interrupted: this machine's share of the running trial was killed")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("export")
def export_cmd(
    fmt: str = typer.Option(..., "--format", help="json, hf, lightning, deepspeed, torchtitan, torchtitan-toml, "
                               "accelerate, megatron (or package.module:function)."),
    pick: str = typer.Option("knee", help="knee | fastest | lowest-loss | lowest-memory | trial:N (an ok trial)."),
    study: str | None = typer.Option(None, help="Study name (default: the storage's only study)."),
    storage: str = typer.Option("sqlite:///cotune.db", help=STORAGE_HELP),
    output: Path | None = typer.Option(None, "--output", "-o", help="File (or folder) to write; default: stdout."),
) -> None:
    """Write one config of the study (a Pareto point by default) for a trainer; never runs training."""
    _quiet_optuna()
    from cotune import export as exporters
    from cotune.export.pick import describe, pick_trial
    from cotune.study import load_study

    exporter = exporters.get_exporter(fmt)  # a bad --format fails before the study is read
    if output is not None and not output.is_dir() and not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist")
    opt_study = load_study(storage, study)
    picked = pick_trial(opt_study, pick)
    exported = exporter(picked.config)

    def say(text: str) -> None:
        err_console.print(text, markup=False, highlight=False, soft_wrap=True)

    say(f"study {opt_study.study_name!r}: {describe(picked)}")
    if picked.filled:
        say(f"note: trial {picked.number} was recorded before {', '.join(picked.filled)} existed; "
            "their defaults are used")
    for item in exported.unexpressed:
        say(f"warning: {fmt} cannot express {item}")
    if output is None:
        sys.stdout.write(exported.text)
        return
    if output.is_dir():
        output = output / f"{opt_study.study_name}-trial-{picked.number:04d}-{fmt}{exported.suffix}"
    output.write_text(exported.text)
    say(f"wrote {output}")


@app.command()
def spaces(
    check: Path | None = typer.Option(None, help="Validate this space file instead of listing the shipped ones."),
) -> None:
    """List the shipped search spaces, or validate one with --check FILE."""
    from rich.table import Table

    from cotune.space import load_space, shipped_spaces

    if check is not None:
        s = load_space(check)
        if s.workload.model != "gpt":  # the model's own config fields are checked by building it (meta device)
            from cotune import workload as workload_mod
            from cotune.data import default_cache_dir

            vocab = s.workload.vocab_size if isinstance(s.workload.vocab_size, int) else 258
            with console.status(f"building {s.workload.model} on the meta device"):
                try:
                    workload_mod.describe(s.workload, vocab_size=vocab, cache_dir=default_cache_dir())
                except UserError as e:
                    raise UserError(f"{check}: {e}") from None
        tunable = [k for k, d in s.knobs.items() if not d.fixed]
        console.print(f"{check}: valid space {s.name!r} ({s.hardware.device}, {s.workload.model}, {len(s.knobs)} knobs, "
                      f"{len(tunable)} tunable: {', '.join(tunable)}; {len(s.constraints)} constraints)")
        return
    table = Table(title="shipped search spaces", header_style="bold")
    for header in ("name", "device", "model", "tunable knobs"):
        table.add_column(header)
    for path in shipped_spaces():
        s = load_space(path)
        w = s.workload
        tunable = sum(not d.fixed for d in s.knobs.values())
        nproc = s.hardware.nproc or "all"
        machines = f" on up to {s.hardware.nnodes} machines" if s.hardware.nnodes > 1 else ""
        table.add_row(s.name, f"{s.hardware.device} x{nproc}{machines}", _model_line(w), str(tunable))
    console.print(table)
    console.print(f"files: {_short(shipped_spaces()[0].parent)}/<name>.yaml; pass one with --space")


def _model_line(w) -> str:
    """One cell for a space's model: its name and the shape the space gives."""
    if w.model == "gpt":
        return f"gpt {w.n_layer}L {w.n_embd}d {w.n_head}h T={w.seq_len}"
    c = w.config
    layers = c.get("num_hidden_layers", c.get("n_layer"))
    hidden = c.get("hidden_size", c.get("n_embd"))
    shape = " ".join(x for x in (f"{layers}L" if layers else "", f"{hidden}d" if hidden else "") if x)
    return f"{w.model} {shape} T={w.seq_len}".replace("  ", " ")


def _short(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:
    """Entry point: user errors (bad flags, files, fields) are one sentence on stderr and exit 2."""
    from rich.markup import escape

    def fail(message: str, code: int) -> None:
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(code)

    try:
        code = app(standalone_mode=False)
    except UserError as e:
        fail(str(e), 2)
    except typer.Abort:
        fail("interrupted", 130)
    except typer.TyperException as e:  # click's usage errors, as vendored by typer
        if type(e).__name__ == "NoArgsIsHelpError":
            console.print(e.format_message(), markup=False, highlight=False)
            sys.exit(0)
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        fail(e.format_message() + where, getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
