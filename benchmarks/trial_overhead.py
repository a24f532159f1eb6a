"""Where a trial's wall time goes, for the default space on this machine.

Runs N real trials through the real engine and runner (a throwaway SQLite study)
and prints the mean and spread of each phase: process start + import, data,
model build, warm-up steps, measured steps, the rest of training + evaluation,
the peak-FLOP/s lookup, process exit, and recording in the study.

    python benchmarks/trial_overhead.py            # 6 trials of the default space
    python benchmarks/trial_overhead.py --trials 10 --space search_spaces/cpu-tiny-gpt.yaml
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from cotune import data, hardware, runner, search, workload
from cotune.space import default_space_path, load_space

PHASES = [
    ("start_and_import", "process start + import"),
    ("data", "data (memory-map tokens)"),
    ("model_build", "model build"),
    ("warmup", "warm-up steps"),
    ("measured", "measured steps"),
    ("rest_and_eval", "rest of training + validation"),
    ("peak_flops", "peak FLOP/s lookup"),
    ("exit", "process exit + result read"),
    ("recording", "recording in the study"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--space", type=Path, default=None)
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fingerprint = hardware.fingerprint()
    space_path = args.space or default_space_path(fingerprint["hardware"]["gpu_count"])
    space = load_space(space_path)
    cache_dir = data.default_cache_dir()
    w = space.workload
    info = data.prepare_data(w.data, cache_dir, seq_len=w.seq_len, tokenizer=w.tokenizer, text_field=w.data_field)
    vocab = info.vocab_size if w.vocab_size == "auto" else w.vocab_size
    described = workload.describe(w, vocab_size=vocab, eot_id=info.eot_id, pad_id=info.pad_id, cache_dir=cache_dir)

    rows: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = search.SearchSettings(
            space=space, space_path=str(space_path), objectives=list(space.objectives), budget=args.trials,
            fingerprint=fingerprint, vocab_size=vocab, runs_dir=Path(tmp) / "runs", sampler="random", seed=0,
            world_size=search.check_hardware(space, str(space_path), fingerprint), workload=described,
        )
        study = search.create_or_resume_study(optuna.storages.RDBStorage(f"sqlite:///{tmp}/bench.db"), "bench", settings)
        returned_at = {}

        def run(config, trial_dir):
            result = runner.launch_trial(config, trial_dir, cache_dir=cache_dir)
            returned_at["t"] = time.perf_counter()
            return result

        def done(progress, result):
            phases = dict(result.phase_seconds)
            inside = sum(v for k, v in phases.items() if k != "process_wall")
            phases["exit"] = phases.get("process_wall", inside) - inside
            phases["recording"] = time.perf_counter() - returned_at["t"]
            phases["total"] = phases.get("process_wall", inside) + phases["recording"]
            rows.append(phases)
            print(f"trial {len(rows)}/{args.trials}: {result.status}, {phases['total']:.2f} s", flush=True)

        search.run_search(study, settings, run, on_done=done)

    print(f"\n{space.name} on {fingerprint['hardware']['cpu_model']} x{fingerprint['hardware']['cpu_count']}, "
          f"{fingerprint['hardware']['gpu_count']} GPU(s), torch {fingerprint['software']['torch']}, "
          f"{len(rows)} trials (seconds per trial, mean ± stdev)\n")
    print("| phase | seconds | share |")
    print("|---|---:|---:|")
    total = statistics.mean(r["total"] for r in rows)
    for key, label in [*PHASES, ("total", "**total per trial**")]:
        values = [r.get(key, 0.0) for r in rows]
        mean = statistics.mean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {label} | {mean:.2f} ± {spread:.2f} | {100 * mean / total:.0f}% |")


if __name__ == "__main__":
    main()
