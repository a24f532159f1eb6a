"""Does TPE learn to avoid infeasible configs when they are told as constraints rather than FAIL?

A synthetic objective over the default CPU space (so each trial costs milliseconds), with an
always-infeasible region where the fastest configs would be: ``micro_batch_size *
global_batch_size <= 128`` (a memory wall) and ``learning_rate <= 5e-3``. Each seed asks the
same number of configs two ways:

- ``constraint``: cotune's own engine (``search.run_search``): an infeasible config is recorded
  PRUNED with ``Trial.set_constraint("feasible", 1.0)``, which TPE models;
- ``fail``: the same asks and derivation, with an infeasible config told FAIL, which TPE ignores
  (how cotune told them before).

It prints, per mode, the median share of infeasible proposals after TPE's ten start-up trials
and the median number of configs launched, over the seeds.

    python benchmarks/infeasible.py                 # 20 seeds x 80 asks, about 2 minutes
    python benchmarks/infeasible.py --seeds 5 --asks 60 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import optuna

from cotune import derive, hardware, search
from cotune.config import TrialConfig, TrialResult
from cotune.space import Constraint, default_space_path, load_space

STARTUP = 10  # TPE's n_startup_trials in cotune's engine: random proposals before it models anything
WALL = [Constraint(expr="micro_batch_size * global_batch_size <= 128", why="synthetic memory wall"),
        Constraint(expr="learning_rate <= 0.005", why="synthetic divergence")]


def synthetic(config: TrialConfig, trial_dir: Path) -> TrialResult:
    """Throughput grows with the micro batch (fastest beyond the wall), loss is best near lr 3e-3."""
    k = config.flat()
    tokens_per_second = 1000.0 * k["micro_batch_size"] * (0.8 if k["activation_checkpointing"] else 1.0) \
        * (1.3 if k["world_size"] == 2 else 1.0)
    loss = 2.0 + (math.log10(k["learning_rate"]) + 2.5) ** 2 + 0.002 * k["global_batch_size"]
    return TrialResult(status="ok", metrics={"tokens_per_second": tokens_per_second, "val_loss": loss})


def run_constraint(settings: search.SearchSettings, asks: int) -> tuple[int, int]:
    """cotune's engine; returns (infeasible proposals after start-up, launched)."""
    study = search.create_or_resume_study(optuna.storages.InMemoryStorage(), "b", settings)
    capped = dataclasses.replace(settings, budget=asks, infeasible_cap=asks)
    # Budget and cap both at `asks`: the search stops once `asks` configs were launched or refused.
    statuses: list[str] = []
    search.run_search(study, capped, synthetic, on_done=lambda p, r: statuses.append(r.status))
    statuses = statuses[:asks]
    return sum(s == "infeasible" for s in statuses[STARTUP:]), sum(s != "infeasible" for s in statuses)


def run_fail(settings: search.SearchSettings, asks: int) -> tuple[int, int]:
    """The same asks and derivation, an infeasible config told FAIL (ignored by TPE)."""
    study = search.create_or_resume_study(optuna.storages.InMemoryStorage(), "b", settings)
    statuses = []
    for _ in range(asks):
        trial = study.ask()
        values = derive.suggest(trial, settings.space, settings.native_precisions, world_size=settings.world_size)
        config, reason = derive.build_config(settings.space, values, world_size=settings.world_size,
                                             vocab_size=settings.vocab_size)
        if reason:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            statuses.append("infeasible")
        else:
            result = synthetic(config, Path("."))
            study.tell(trial, [result.metrics["tokens_per_second"], result.metrics["val_loss"]])
            statuses.append("ok")
    return sum(s == "infeasible" for s in statuses[STARTUP:]), sum(s != "infeasible" for s in statuses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--asks", type=int, default=80)
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = default_space_path(0)
    space = load_space(path)
    space = space.model_copy(update={"constraints": [*space.constraints, *WALL], "baseline": {}})
    fingerprint = hardware.fingerprint()
    world = search.check_hardware(space, str(path), fingerprint)
    started = time.perf_counter()
    figures = {}
    for mode, run in (("constraint", run_constraint), ("fail", run_fail)):
        shares, launched = [], []
        for seed in range(args.seeds):
            settings = search.SearchSettings(
                space=space, space_path=str(path), objectives=["tokens_per_second", "val_loss"], budget=args.asks,
                fingerprint=fingerprint, vocab_size=258, runs_dir=Path("unused"), seed=seed, world_size=world)
            infeasible, ran = run(settings, args.asks)
            shares.append(infeasible / (args.asks - STARTUP))
            launched.append(ran)
        figures[mode] = {"infeasible_share_after_startup": statistics.median(shares),
                         "launched": statistics.median(launched), "shares": shares}
        print(f"{mode:>10}: infeasible proposals after start-up {statistics.median(shares):.0%} (median of "
              f"{args.seeds} seeds; range {min(shares):.0%}-{max(shares):.0%}), configs launched of {args.asks}: "
              f"{statistics.median(launched):.0f}")
    ratio = figures["constraint"]["infeasible_share_after_startup"] / max(
        figures["fail"]["infeasible_share_after_startup"], 1e-9)
    print(f"told as constraints, TPE proposes {ratio:.2f}x the infeasible configs it proposes when told FAIL "
          f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
