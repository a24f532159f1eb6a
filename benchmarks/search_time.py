"""Where a whole search's wall time goes, and what front it finds, for each engine: every trial whole (started fresh or warm), early stopping, reuse, both.

Runs the real engine and runner (as `cotune search` does: warm starts unless the mode is cold, the space's baseline
as trial 0, a throwaway SQLite study) once per mode with the same seed, then reads each
study: the search's wall time, the share of it spent inside training steps (the trials'
warm-up, measured and remaining steps by their phase times), what the rest went to, how
many trials were stopped early, and the hypervolume of the front each found. The
hypervolume's reference point is the worst of the baselines' measured values, so it
is the volume of configs that beat the baseline on both throughput and loss.

    python benchmarks/search_time.py                      # the default space, budget 50: plain, then both
    python benchmarks/search_time.py --modes cold,plain,stop,reuse,both
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
from prepared import Prepared, prepare

from cotune import runner, search
from cotune.early_stop import Halving
from cotune.report import analysis
from cotune.space import OBJECTIVES

TRAINING = ("warmup", "measured", "rest")  # phases that are training steps
OTHER = [("start_and_import", "process start + import"), ("data", "data"), ("model_build", "model build"),
         ("rung_eval", "rung validations"), ("eval", "final validation"), ("peak_flops", "peak FLOP/s lookup")]


MODES = {  # name: (early stopping, reuse, warm starts)
    "cold": (False, False, False), "plain": (False, False, True), "stop": (True, False, True),
    "reuse": (False, True, True), "both": (True, True, True),
}


def run_mode(mode: str, args, prepared: Prepared, folder: Path):
    """One search; returns its study and wall seconds."""
    early, reuse, warm = MODES[mode]
    cache_dir = prepared.cache_dir
    settings = prepared.settings(budget=args.budget, runs_dir=folder / "runs", sampler="tpe", seed=args.seed,
                                 cache_dir=cache_dir, early_stopping=Halving() if early else None, factorise=reuse)
    study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{folder}/bench.db"), "bench",
                                          settings, baseline=True)
    fork_server = runner.ForkServer(folder / "fork-server.log")

    def run(config, trial_dir, on_rung=None):
        return runner.launch_trial(config, trial_dir, cache_dir=cache_dir, fork_server=fork_server if warm else None,
                                   on_rung=on_rung)

    def done(progress, result):
        print(f"  {mode} trial {progress.done}/{args.budget}: {result.status}", flush=True)

    start = time.perf_counter()
    try:
        search.run_search(study, settings, run, on_done=done)
    finally:
        fork_server.close()
    return study, time.perf_counter() - start


def summarise(study: optuna.Study, wall: float) -> dict:
    trials = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") != "infeasible"]
    phases = [t.user_attrs.get("phase_seconds") or {} for t in trials]
    out = {"wall": wall, "trials": len(trials), "training": sum(p.get(k, 0.0) for p in phases for k in TRAINING)}
    for key, _ in OTHER:
        out[key] = sum(p.get(key, 0.0) for p in phases)
    out["outside"] = wall - sum(p.get("process_wall", 0.0) for p in phases)  # the search's own work between trials
    # Inside a trial's process wall but in none of its phases: exiting, and for a trial stopped at a rung, the
    # steps after the rung until the runner heard it, and the kill.
    out["exit"] = sum(max(0.0, p.get("process_wall", 0.0) - sum(v for k, v in p.items() if k != "process_wall"))
                      for p in phases)
    out["ok"] = sum(t.user_attrs["status"] == "ok" for t in trials)
    out["pruned"] = sum(t.user_attrs["status"] == "pruned" for t in trials)
    out["front"] = [t for t in study.best_trials if t.user_attrs.get("status") == "ok"]
    measured = [t.user_attrs.get("measured") or {} for t in trials if t.user_attrs["status"] == "ok"]
    out["reused_tput"] = sum(m.get("throughput", "here") != "here" for m in measured)
    out["reused_loss"] = sum(m.get("loss", "here") not in ("here", "layout") for m in measured)
    out["nothing_ran"] = sum(m.get("throughput", "here") != "here" and m.get("loss", "here") not in ("here", "layout")
                             for m in measured)
    out["baseline"] = next(t.values for t in trials if t.user_attrs.get("baseline") and t.values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", type=Path, default=None)
    parser.add_argument("--modes", default="plain,both",
                        help="comma-separated: cold (every trial whole, started fresh), plain (every trial whole, "
                        "warm starts), stop (early stopping), reuse (measure only what the study has not), both "
                        "(the default engine)")
    args = parser.parse_args()

    prepared = prepare(args.space)
    space = prepared.space

    results = {}
    for mode in [m.strip() for m in args.modes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            print(f"{mode}: {args.budget} trials of {space.name}", flush=True)
            study, wall = run_mode(mode, args, prepared, Path(tmp))
            results[mode] = summarise(study, wall)

    directions = [OBJECTIVES[o][1] for o in space.objectives]
    baselines = analysis.as_minimised(np.array([r["baseline"] for r in results.values()]), directions)
    reference = baselines.max(axis=0)  # the worse baseline on each objective
    print(f"\n{space.name}, budget {args.budget}, seed {args.seed}, on {prepared.machine()}\n")
    print("| engine | " + " | ".join(results) + " |\n|---|" + "---:|" * len(results))

    def row(label, fn):
        print(f"| {label} | " + " | ".join(fn(r) for r in results.values()) + " |")

    row("search wall time", lambda r: f"{r['wall']:.0f} s")
    row("trials launched (ok / stopped early)", lambda r: f"{r['trials']} ({r['ok']} / {r['pruned']})")
    row("ok trials that reused a throughput / a loss / ran nothing", lambda r: f"{r['reused_tput']} / {r['reused_loss']} / "
        f"{r['nothing_ran']}")
    row("**inside training steps**", lambda r: f"**{100 * r['training'] / r['wall']:.0f}%** ({r['training']:.0f} s)")
    for key, label in OTHER:
        row(label, lambda r, key=key: f"{100 * r[key] / r['wall']:.0f}%")
    row("exit, or a stopped trial's steps after its rung and its kill", lambda r: f"{100 * r['exit'] / r['wall']:.0f}%")
    row("between trials (search, record)", lambda r: f"{100 * r['outside'] / r['wall']:.0f}%")
    row("Pareto configs", lambda r: str(len(r["front"])))
    row("hypervolume beyond the baseline", lambda r: f"{analysis.hypervolume(analysis.as_minimised(np.array([t.values for t in r['front']]), directions), reference):.1f}"
        if r["front"] else "0")


if __name__ == "__main__":
    main()
