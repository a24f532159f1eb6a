"""What packing trials onto one machine (`cotune search --jobs N`) does to the search and its numbers.

Runs the same search twice, one trial at a time (--jobs 1) and N at once (--jobs N), with the
random sampler and one --seed, so both runs propose the same config for each trial number
(the sampler is seeded per trial); early stopping and reuse are off, so every trial trains its
whole budget. Prints the wall time of each search and, for each trial both ran, how its
measured throughput changed when packed, by the trial's process count.

    python benchmarks/packing.py                    # --jobs 2, 12 trials of the default CPU space
    python benchmarks/packing.py --jobs 2 --budget 16 --space search_spaces/cpu-tiny-gpt.yaml --seed 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--budget", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu-tiny-gpt.yaml")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for jobs in (1, args.jobs):
            runs[jobs] = _search(Path(tmp) / f"jobs{jobs}", args, jobs)
        alone, packed = runs[1], runs[args.jobs]
        print(f"\n| | --jobs 1 | --jobs {args.jobs} |\n|---|---:|---:|")
        print(f"| search wall time, {args.budget} trials | {alone['wall']:.0f} s | {packed['wall']:.0f} s |")
        print(f"| trials per minute | {60 * args.budget / alone['wall']:.1f} | {60 * args.budget / packed['wall']:.1f} |")
        for world in sorted({w for w, _ in alone["trials"].values()}):
            both = [(alone["trials"][n][1], packed["trials"][n][1]) for n in alone["trials"]
                    if n in packed["trials"] and alone["trials"][n][0] == world]
            if not both:
                continue
            ratios = [p / a for a, p in both]
            print(f"| {world}-process trials: median tokens/s | {statistics.median(a for a, _ in both):,.0f} | "
                  f"{statistics.median(p for _, p in both):,.0f} (x{statistics.median(ratios):.2f}, "
                  f"{min(ratios):.2f}-{max(ratios):.2f}; {len(both)} trials) |")


def _search(folder: Path, args, jobs: int) -> dict:
    """Run the search in ``folder``; its wall time and each ok trial's (process count, tokens/s) by number."""
    folder.mkdir(parents=True)
    argv = [sys.executable, "-m", "cotune.cli", "search", "--space", str(args.space.resolve()), "--budget",
            str(args.budget), "--seed", str(args.seed), "--sampler", "random", "--no-early-stopping", "--no-reuse",
            "--jobs", str(jobs)]
    print(f"--jobs {jobs}: {args.budget} trials ...", flush=True)
    t = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"--jobs {jobs} search failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    storage = f"sqlite:///{folder / 'cotune.db'}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    trials = {t.number: (t.user_attrs["knobs"]["world_size"], t.user_attrs["metrics"]["tokens_per_second"])
              for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") == "ok"}
    print(f"  {wall:.0f} s, {len(trials)} ok", flush=True)
    return {"wall": wall, "trials": trials}


if __name__ == "__main__":
    main()
