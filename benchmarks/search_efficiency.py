"""Replay samplers and cotune's engine on a table of real trials: wall-clock and trials to 95% hypervolume.

The table (benchmarks/data/cpu-tiny-gpt-table.jsonl.gz, made by benchmarks/record_table.py) holds
real trials of the discretised default CPU space, each with its metrics, loss curve, rung losses and
phase times. Each engine here runs cotune's real search loop (derive, constraints, the memory model,
early stopping, reuse) with a run function that, instead of training, looks the config up in the
table (the same knob values, else the nearest recorded config) and advances a simulated clock by
what that trial took: its whole wall time (less its rung validations when the engine does not stop
early); up to the rung where the engine stopped it; its start, model build and timed window for a
measure-only run; nothing when every value is reused. Each row's start and exit are today's, as
measured by process count for warm starts (forked from the fork server) and fresh ones (START_EXIT_S).

The target is 95% of the hypervolume of the table's own Pareto front (tokens/s against validation
loss, from the worst recorded value of each). Reported over seeds: the median simulated wall-clock
and the median number of launched trials until an engine's front (the values it recorded) reaches
it. An engine that has not within --budget trials counts as never (inf); the median can then be inf.

    python benchmarks/search_efficiency.py                     # 20 seeds, every engine
    python benchmarks/search_efficiency.py --seeds 3 --engines cotune,tpe --svg ''
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from prepared import Prepared, prepare

from cotune import search
from cotune.config import TrialConfig, TrialResult
from cotune.early_stop import Halving
from cotune.report import analysis

ROOT = Path(__file__).resolve().parent
SPACE = ROOT / "spaces" / "cpu-tiny-gpt-discrete.yaml"
TABLE = ROOT / "data" / "cpu-tiny-gpt-table.jsonl.gz"
SVG = ROOT / "data" / "search-efficiency.svg"
TARGET_SHARE = 0.95
RECORD_S = 0.06  # recording one trial in the study (benchmarks/trial_overhead.py)
# A trial's start (process start + import) and exit (its last phase to the runner seeing its tree gone), in
# seconds, by start and process count: `python benchmarks/trial_overhead.py --trials 10 --compare`. The table
# was recorded when one-process trials forked a server that imported less and torchrun started two-process
# ones fresh; each row's own start and exit are replaced by these.
START_EXIT_S = {"warm": {1: (0.03, 0.02), 2: (0.03, 0.53)}, "fresh": {1: (2.24, 0.06), 2: (2.71, 2.11)}}


@dataclass(frozen=True)
class Engine:
    sampler: str  # "cotune" (cotune's TPE), "tpe" (Optuna's TPE with its defaults), or cotune's "nsga2", "gp", "random"
    stop: bool = False
    reuse: bool = False
    warm: bool = True


ENGINES = {
    "cotune": Engine("cotune", stop=True, reuse=True),
    "cotune without early stopping": Engine("cotune", reuse=True),
    "cotune without reuse": Engine("cotune", stop=True),
    "cotune with cold starts": Engine("cotune", stop=True, reuse=True, warm=False),
    "cotune's TPE alone": Engine("cotune"),
    "tpe": Engine("tpe"),
    "nsga2": Engine("nsga2"),
    "gp": Engine("gp"),
    "random": Engine("random"),
}


class Reached(Exception):
    """The engine's front reached the target: this replay is done."""


class Table:
    """The recorded trials, looked up by knob values (the nearest when none matches)."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows
        self.exact = {json.dumps(r["knobs"], sort_keys=True): r for r in rows}
        names = sorted({k for r in rows for k in r["knobs"]})
        self.numeric = {k for k in names if all(isinstance(r["knobs"].get(k), (int, float))
                                                and not isinstance(r["knobs"].get(k), bool) for r in rows)}
        values = {k: [float(r["knobs"][k]) for r in rows] for k in self.numeric}
        # A knob spanning a decade or more (the learning rate) is compared on a log scale, the others linearly.
        self.log = {k for k, v in values.items() if min(v) > 0 and max(v) >= 10 * min(v)}
        self.span = {k: (max(map(self._scale(k), v)) - min(map(self._scale(k), v))) or 1.0 for k, v in values.items()}
        self.names = names
        ok = [r for r in rows if r["status"] == "ok"]
        points = np.array([[r["metrics"]["tokens_per_second"], r["metrics"]["val_loss"]] for r in ok])
        self.minimised = analysis.as_minimised(points, ["maximize", "minimize"])
        self.reference = self.minimised.max(axis=0)
        self.true_hypervolume = analysis.hypervolume(self.minimised, self.reference)

    def lookup(self, knobs: dict[str, Any]) -> dict[str, Any]:
        row = self.exact.get(json.dumps(knobs, sort_keys=True))
        return row if row is not None else min(self.rows, key=lambda r: self._distance(knobs, r["knobs"]))

    def _scale(self, knob: str):
        return (lambda v: math.log(float(v))) if knob in self.log else float

    def _distance(self, a: dict[str, Any], b: dict[str, Any]) -> float:
        d = 0.0
        for k in self.names:
            x, y = a.get(k), b.get(k)
            if k in self.numeric and isinstance(x, (int, float)):
                scale = self._scale(k)
                d += abs(scale(x) - scale(y)) / self.span[k]
            else:
                d += x != y
        return d


def load_table(path: Path) -> Table:
    with gzip.open(path, "rt") as f:
        return Table([json.loads(line) for line in f])


class Replay:
    """One engine on one seed: the search loop over the table, a simulated clock, the hypervolume over time."""

    def __init__(self, table: Table, engine: Engine, window: int):
        self.table, self.engine = table, engine
        self.window = window  # warm-up + measured steps: the rest of training comes after them
        self.clock = 0.0
        self.curve: list[tuple[float, int, float]] = []  # (seconds, trials, share of the true hypervolume)

    def run(self, config: TrialConfig, trial_dir: Path, on_rung=None) -> TrialResult:
        row = self.table.lookup(config.flat())
        phases = {k: float(v) for k, v in row["phase_seconds"].items()}
        wall = phases.pop("process_wall", 0.0)
        # The recorded start and exit are replaced by today's, measured by process count (START_EXIT_S).
        recorded_exit = max(0.0, wall - sum(phases.values()))
        start, exit_ = START_EXIT_S["warm" if self.engine.warm else "fresh"][min(config.parallel.world_size, 2)]
        wall += start - phases.get("start_and_import", 0.0) + exit_ - recorded_exit
        phases["start_and_import"] = start
        if row["status"] != "ok":
            return self._spent(wall, TrialResult(row["status"], reason="recorded as " + row["status"]))
        metrics = {k: v for k, v in row["metrics"].items() if v is not None}
        metrics["tokens_per_second"] = float(metrics["tokens_per_second"])
        if config.run.measure_only:  # start, build, the timed window, exit
            short = exit_ + sum(phases.get(k, 0.0) for k in
                                ("start_and_import", "data", "model_build", "warmup", "measured"))
            metrics.pop("val_loss", None)
            return self._spent(short, TrialResult("ok", metrics=metrics, phase_seconds={"process_wall": short}))
        rungs = row.get("rungs") or []
        if on_rung is None:
            wall -= phases.get("rung_eval", 0.0)
        for i, r in enumerate(rungs):
            if on_rung is None:
                break
            record = {"rung": r["rung"], "step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"],
                      "metrics": {**metrics, "rung_val_loss": r["val_loss"]}}
            why = on_rung(record)
            if why:  # it ran to this rung: the rest of training after it, the validation and later rungs are saved
                budget_steps = float(metrics["tokens_trained"]) * r["step"] / r["tokens"]
                done = (r["step"] - self.window) / max(1.0, budget_steps - self.window)
                left = (1 - done) * phases.get("rest", 0.0) + phases.get("eval", 0.0) \
                    + phases.get("rung_eval", 0.0) * (len(rungs) - i - 1) / len(rungs)
                stopped = {**metrics, "rung_val_loss": r["val_loss"]}
                stopped.pop("val_loss", None)
                return self._spent(wall - left, TrialResult("pruned", metrics=stopped, reason=why))
        return self._spent(wall, TrialResult("ok", metrics=metrics, loss_curve=row["loss_curve"],
                                             phase_seconds={**phases, "process_wall": wall}))

    def _spent(self, seconds: float, result: TrialResult) -> TrialResult:
        self.clock += max(0.0, seconds)
        return result

    def done(self, study: optuna.Study, progress: search.Progress) -> None:
        self.clock += RECORD_S
        points = [t.values for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
        share = 0.0
        if points:
            mins = analysis.as_minimised(np.array(points), ["maximize", "minimize"])
            share = analysis.hypervolume(mins, self.table.reference) / self.table.true_hypervolume
        self.curve.append((self.clock, progress.done, share))
        if share >= TARGET_SHARE:
            raise Reached


def replay(table: Table, engine: Engine, seed: int, budget: int, prepared: Prepared) -> Replay:
    """One replay; its curve ends where the engine reached the target or spent the budget."""
    space = prepared.space
    settings = prepared.settings(
        budget=budget, runs_dir=Path("/nonexistent"), seed=seed,
        sampler="tpe" if engine.sampler in ("cotune", "tpe") else engine.sampler,  # cotune.samplers' own
        early_stopping=Halving() if engine.stop else None, factorise=engine.reuse)
    study = search.create_or_resume_study(optuna.storages.InMemoryStorage(), "replay", settings)
    if engine.sampler == "tpe":  # Optuna's TPE as it comes, not cotune's (multivariate, grouped)
        study.sampler = optuna.samplers.TPESampler(seed=seed)
    r = Replay(table, engine, space.trial.warmup_steps + space.trial.measured_steps)
    try:
        search.run_search(study, settings, r.run, on_done=lambda p, res: r.done(study, p))
    except Reached:
        pass
    return r


def reached(r: Replay) -> tuple[float, float]:
    """(simulated seconds, trials) when the replay reached the target; inf if it never did."""
    return next(((s, n) for s, n, share in r.curve if share >= TARGET_SHARE), (math.inf, math.inf))


def run_all(table: Table, engines: list[str], seeds: int, budget: int) -> dict[str, list[Replay]]:
    prepared = prepare(SPACE)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    out = {}
    for name in engines:
        t = time.perf_counter()
        out[name] = [replay(table, ENGINES[name], seed, budget, prepared) for seed in range(seeds)]
        times, trials = zip(*(reached(r) for r in out[name]))
        print(f"{name}: median {statistics.median(times):.0f} s, {statistics.median(trials):.0f} trials to "
              f"{TARGET_SHARE:.0%} (replayed in {time.perf_counter() - t:.0f} s)", flush=True)
    return out


def svg(results: dict[str, list[Replay]], path: Path, horizon: float) -> None:
    """Median share of the true hypervolume against simulated wall-clock, one line per engine."""
    w, h, pad = 720, 420, 60
    grid = np.linspace(0, horizon, 200)
    colours = ["#2563eb", "#93c5fd", "#60a5fa", "#1e40af", "#7c3aed", "#d97706", "#059669", "#dc2626", "#6b7280"]
    lines = []
    for (name, replays), colour in zip(results.items(), colours):
        shares = [[max([s for c, _, s in r.curve if c <= x], default=0.0) for x in grid] for r in replays]
        median = np.median(np.array(shares), axis=0)
        pts = " ".join(f"{pad + (w - 2 * pad) * x / horizon:.1f},{h - pad - (h - 2 * pad) * y:.1f}"
                       for x, y in zip(grid, median, strict=True))
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        k = len(lines) - 1
        lines.append(f'<text x="{w - pad - 170}" y="{pad + 16 * k}" fill="{colour}" font-size="12">{name}</text>')
    target_y = h - pad - (h - 2 * pad) * TARGET_SHARE
    axes = [f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#111"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#111"/>',
            f'<line x1="{pad}" y1="{target_y:.1f}" x2="{w - pad}" y2="{target_y:.1f}" stroke="#999" stroke-dasharray="4"/>',
            f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle" font-size="12">simulated wall-clock (s)</text>',
            f'<text x="20" y="{h / 2}" transform="rotate(-90 20 {h / 2})" text-anchor="middle" font-size="12">'
            "median share of the table's hypervolume</text>"]
    for x in np.linspace(0, horizon, 6):
        px = pad + (w - 2 * pad) * x / horizon
        axes.append(f'<text x="{px:.0f}" y="{h - pad + 16}" text-anchor="middle" font-size="11">{x:.0f}</text>')
    for y in (0.0, 0.5, 0.95, 1.0):
        axes.append(f'<text x="{pad - 6}" y="{h - pad - (h - 2 * pad) * y + 4:.0f}" text-anchor="end" '
                    f'font-size="11">{y:.2f}</text>')
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                    f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
                    + "".join(axes + lines) + "</svg>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--budget", type=int, default=150, help="launched trials an engine may spend")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of: {', '.join(ENGINES)}")
    parser.add_argument("--table", type=Path, default=TABLE)
    parser.add_argument("--svg", default=str(SVG), help="where the curves go ('' for none)")
    parser.add_argument("--json", type=Path, default=None, help="also write each engine's medians here")
    args = parser.parse_args()
    table = load_table(args.table)
    print(f"{len(table.rows)} recorded trials; the table's front holds "
          f"{int(analysis.nondominated(table.minimised).sum())} of them", flush=True)
    results = run_all(table, [e.strip() for e in args.engines.split(",")], args.seeds, args.budget)
    print(f"\n| engine | median wall-clock to {TARGET_SHARE:.0%} | median trials to {TARGET_SHARE:.0%} | reached |")
    print("|---|---:|---:|---:|")
    for name, replays in results.items():
        times, trials = zip(*(reached(r) for r in replays))
        hit = sum(math.isfinite(t) for t in times)
        print(f"| {name} | {statistics.median(times):.0f} s | {statistics.median(trials):.0f} | {hit}/{len(replays)} |")
    if args.json is not None:
        medians = {name: {"seconds": statistics.median(reached(r)[0] for r in rs),
                          "trials": statistics.median(reached(r)[1] for r in rs),
                          "reached": sum(math.isfinite(reached(r)[0]) for r in rs), "seeds": len(rs)}
                   for name, rs in results.items()}
        args.json.write_text(json.dumps(medians, indent=2).replace("Infinity", '"inf"'))
    if args.svg:
        finite = [reached(r)[0] for rs in results.values() for r in rs if math.isfinite(reached(r)[0])]
        svg(results, Path(args.svg), horizon=max(finite, default=600.0) * 1.1)
        print(f"curves: {args.svg}")


if __name__ == "__main__":
    main()
