"""Record real trials over the discretised default CPU space: the table a replay benchmark runs samplers on.

Runs random configs of benchmarks/spaces/cpu-tiny-gpt-discrete.yaml (the default space with
every knob a finite choice) through the real engine and runner, as `cotune search` does (warm
starts, the memory model, constraints), every trial with the same training seed and to its
whole budget, its rungs recorded as early stopping would hear them but never acted on. The
trials go into an Optuna study (SQLite), so the recording resumes: a rerun adds trials until
the study holds --trials. --export writes the table, one JSON line per trial: its knobs as
they ran, status, metrics, rungs, loss curve (at most 50 points) and phase seconds.

    python benchmarks/record_table.py --trials 400      # about 10 s a trial on two cores; resumable
    python benchmarks/record_table.py --export          # -> benchmarks/data/cpu-tiny-gpt-table.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import optuna
from prepared import prepare

from cotune import runner, search
from cotune.early_stop import Halving
from cotune.study import trial_knobs
from cotune.trial.measure import subsample

ROOT = Path(__file__).resolve().parent
SPACE = ROOT / "spaces" / "cpu-tiny-gpt-discrete.yaml"
TABLE = ROOT / "data" / "cpu-tiny-gpt-table.jsonl.gz"
STUDY = "cpu-tiny-gpt-table"
CURVE_POINTS = 50
NEVER_STOP = Halving(eta=2**31)  # rungs reported and recorded; a trial goes on while fewer than eta reached a rung


def record(trials: int, storage: str, seed: int) -> None:
    prepared = prepare(SPACE)
    cache_dir = prepared.cache_dir
    settings = prepared.settings(budget=trials, runs_dir=Path("cotune-runs") / STUDY, sampler="random", seed=seed,
                                 cache_dir=cache_dir, early_stopping=NEVER_STOP)
    study = search.create_or_resume_study(optuna.storages.RDBStorage(storage), STUDY, settings)
    fork_server = runner.ForkServer(settings.runs_dir / "fork-server.log")
    started = time.monotonic()

    def run(config, trial_dir, on_rung=None):
        return runner.launch_trial(config, trial_dir, cache_dir=cache_dir, fork_server=fork_server, on_rung=on_rung)

    def done(progress, result):
        print(f"{progress.done}/{trials} {result.status} ({time.monotonic() - started:.0f} s)", flush=True)

    try:
        search.run_search(study, settings, run, on_done=done)
    finally:
        fork_server.close()


def export(storage: str, path: Path) -> int:
    study = optuna.load_study(study_name=STUDY, storage=storage)
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("status") not in ("ok", "oom", "timeout", "crash", "diverged"):
            continue  # infeasible configs never ran: the replay asks the same rules
        m = a.get("metrics") or {}
        rows.append({
            "number": t.number, "status": a["status"], "knobs": trial_knobs(t),
            "metrics": {k: m.get(k) for k in ("tokens_per_second", "val_loss", "peak_memory_bytes",
                                              "step_time_mean_s", "step_time_std_s", "tokens_trained")},
            "rungs": a.get("rungs") or [], "loss_curve": subsample(a.get("loss_curve") or [], CURVE_POINTS),
            "phase_seconds": a.get("phase_seconds") or {},
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400, help="trials the study should hold")
    parser.add_argument("--storage", default="sqlite:///cotune-table.db")
    parser.add_argument("--seed", type=int, default=0, help="sampler and training seed")
    parser.add_argument("--export", action="store_true", help="write the table (--table)")
    parser.add_argument("--table", type=Path, default=TABLE)
    args = parser.parse_args()
    if args.export:
        print(f"{export(args.storage, args.table)} trials -> {args.table}")
    else:
        record(args.trials, args.storage, args.seed)


if __name__ == "__main__":
    main()
