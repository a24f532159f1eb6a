"""Where a trial's wall time goes, for the default space on this machine.

Runs N real trials through the real engine and runner (a throwaway SQLite study)
and prints the mean and spread of each phase: process start + import, data,
model build, warm-up steps, measured steps, the rest of training + evaluation,
the peak-FLOP/s lookup, process exit, and recording in the study.

    python benchmarks/trial_overhead.py            # 6 trials of the default space
    python benchmarks/trial_overhead.py --trials 10 --space search_spaces/cpu-tiny-gpt.yaml
    python benchmarks/trial_overhead.py --trials 8 --compare   # fresh starts, then warm ones (fork server)

Trials are forked from a warm fork server as `cotune search` does (a two-process trial runs
torchrun there with its ranks forked); --no-warm-start starts each in a fresh interpreter,
--compare measures both, with start and exit by process count.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
from prepared import Prepared, prepare

from cotune import runner, search

PHASES = [
    ("start_and_import", "process start + import"),
    ("data", "data (memory-map tokens)"),
    ("model_build", "model build"),
    ("warmup", "warm-up steps"),
    ("measured", "measured steps"),
    ("rest", "rest of training"),
    ("rung_eval", "rung validations (early stopping)"),
    ("eval", "validation"),
    ("peak_flops", "peak FLOP/s lookup"),
    ("exit", "process exit + result read"),
    ("recording", "recording in the study"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--space", type=Path, default=None)
    parser.add_argument("--no-warm-start", action="store_true", help="start each trial in a fresh interpreter")
    parser.add_argument("--compare", action="store_true", help="fresh starts first, then warm ones")
    args = parser.parse_args()

    prepared = prepare(args.space)

    modes = [False, True] if args.compare else [not args.no_warm_start]
    means = {warm: _measure(args, prepared, warm) for warm in modes}
    if args.compare:
        print("\n| phase | fresh start | warm start |\n|---|---:|---:|")
        for key, label in [*PHASES, ("total", "**total per trial**")]:
            print(f"| {label} | {means[False][key]:.2f} | {means[True][key]:.2f} |")
        for what, label in (("start", "process start + import"), ("exit", "process exit + result read")):
            for key in sorted(k for k in means[True] if k.startswith(f"{what}_") and k[len(what) + 1:].isdigit()):
                print(f"| {label}, {key.removeprefix(what + '_')}-process trials | {means[False].get(key, 0.0):.2f} | "
                      f"{means[True][key]:.2f} |")


def _measure(args, prepared: Prepared, warm: bool) -> dict[str, float]:
    """Run the trials (forked from a fork server if ``warm``), print the table; the mean of each phase."""
    rows: list[dict[str, float]] = []
    fork_server = runner.ForkServer() if warm else None
    with tempfile.TemporaryDirectory() as tmp:
        settings = prepared.settings(budget=args.trials, runs_dir=Path(tmp) / "runs", sampler="random", seed=0)
        study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp}/bench.db"), "bench", settings)
        returned_at = {}

        if fork_server is not None:
            t = time.perf_counter()
            fork_server.start(runner.trial_env(prepared.space.hardware.device))  # the env its trials will have
            print(f"fork server ready in {time.perf_counter() - t:.2f} s (once per search)", flush=True)

        def run(config, trial_dir):
            result = runner.launch_trial(config, trial_dir, cache_dir=prepared.cache_dir, fork_server=fork_server)
            returned_at["t"] = time.perf_counter()
            returned_at["processes"] = config.parallel.world_size
            return result

        def done(progress, result):
            phases = dict(result.phase_seconds)
            inside = sum(v for k, v in phases.items() if k != "process_wall")
            phases["exit"] = phases.get("process_wall", inside) - inside
            phases["recording"] = time.perf_counter() - returned_at["t"]
            phases["total"] = phases.get("process_wall", inside) + phases["recording"]
            phases["processes"] = returned_at["processes"]
            rows.append(phases)
            print(f"trial {len(rows)}/{args.trials}: {result.status}, {returned_at['processes']} process(es), start "
                  f"{phases.get('start_and_import', 0.0):.2f} s, {phases['total']:.2f} s", flush=True)

        try:
            search.run_search(study, settings, run, on_done=done)
        finally:
            if fork_server is not None:
                fork_server.close()

    print(f"\n{prepared.space.name} ({'warm' if warm else 'fresh'} starts) on {prepared.machine()}, "
          f"{len(rows)} trials (seconds per trial, mean ± stdev)\n")
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    total = statistics.mean(r["total"] for r in rows)
    means = {}
    for key, label in [*PHASES, ("total", "**total per trial**")]:
        values = [r.get(key, 0.0) for r in rows]
        means[key] = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label} | {means[key]:.2f} ± {spread:.2f} | {100 * means[key] / total:.0f}% |")
    # Starting and exiting by process count: a warm two-process trial forks torchrun and its ranks.
    for n in sorted({int(r["processes"]) for r in rows}):
        for key, what in (("start_and_import", "start"), ("exit", "exit")):
            values = [r.get(key, 0.0) for r in rows if r["processes"] == n]
            means[f"{what}_{n}"] = statistics.mean(values)
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"process {what} of the {len(values)} {n}-process trial(s): {means[f'{what}_{n}']:.2f} ± "
                  f"{spread:.2f} s")
    return means


if __name__ == "__main__":
    main()
