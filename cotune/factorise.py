"""Speed and loss apart: reuse what a study measured, and train new losses on the quickest layout.

Throughput and memory depend on the system knobs (parallel layout, micro batch, checkpointing,
compile, Triton tiles, the pipeline's schedule) together with the global batch, the precision
and which kernels run; not on the learning rate, the schedule, AdamW's settings or the seed.
In fp32 the loss depends on the algorithm knobs (global batch, learning rate, schedule, AdamW,
gradient clipping, kernels, seed) and not on the system knobs: the equivalence gate
(tests/test_parallel.py, tests/test_kernels.py) holds every layout and micro batch to the
one-process fp32 loss at every step. In bf16 and fp16 the rounding differs by layout, so
their losses are never reused.

So for a proposed config a search can often run less than a whole trial (:func:`plan`):

- its throughput was measured on a config with the same :func:`throughput_key`, and its loss
  on one with the same :func:`loss_key`: nothing runs; both values are the other trials';
- only the throughput is new: the trial runs the warm-up and measured steps only;
- only the loss is new: it is trained on the layout whose whole trial took the least wall
  time for that global batch, precision and kernels (if that is not this config's own), and
  this config's throughput is the one measured before;
- both are new: the trial runs as usual.

Every reused value names the trial it came from (``measured`` in the trial's user attrs).
Nothing here imports torch or starts a process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from cotune.config import TrialConfig, TrialResult

# What the loss depends on besides the workload and the run, which a study fixes.
LOSS_KNOBS = ("global_batch_size", "precision", "learning_rate", "warmup_fraction", "weight_decay", "adam_beta1",
              "adam_beta2", "grad_clip", "mlp_kernel", "cross_entropy_kernel", "layernorm_kernel")
# What throughput does not depend on (the rest of TrialConfig.flat does).
NOT_THROUGHPUT = ("learning_rate", "warmup_fraction", "weight_decay", "adam_beta1", "adam_beta2", "grad_clip")
# Metrics that come with the throughput measurement, and with the loss.
THROUGHPUT_METRICS = ("tokens_per_second", "step_time_mean_s", "step_time_std_s", "peak_memory_bytes",
                      "peak_memory_source", "peak_rss_bytes", "peak_memory_reserved_bytes", "mfu", "peak_flops",
                      "peak_flops_source", "flops_per_token", "n_params")
LOSS_METRICS = ("val_loss", "train_steps", "tokens_trained", "budget_steps", "fp16_skipped_steps")


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True)


def throughput_key(config: TrialConfig) -> str:
    """What the config's throughput and memory depend on: every knob but the optimizer's."""
    flat = config.flat()
    return _key({k: v for k, v in flat.items() if k not in NOT_THROUGHPUT})


def loss_key(config: TrialConfig) -> str | None:
    """What the config's fp32 loss depends on (with the training seed); None in bf16/fp16, never reused."""
    if config.precision.precision != "fp32":
        return None
    flat = config.flat()
    return _key({**{k: flat[k] for k in LOSS_KNOBS}, "seed": config.run.seed})


def system_of(fast: TrialConfig, config: TrialConfig) -> TrialConfig:
    """``config`` run with ``fast``'s system knobs (layout, micro batch, checkpointing, compile, tiles)."""
    kernels = replace(fast.kernels, mlp=config.kernels.mlp, cross_entropy=config.kernels.cross_entropy,
                      layernorm=config.kernels.layernorm)
    return replace(config, batch=fast.batch, parallel=fast.parallel, software=fast.software, kernels=kernels)


@dataclass(frozen=True)
class Plan:
    """What a proposed config needs to run. ``throughput_from`` / ``loss_from``: the trial numbers whose
    measurement it reuses (None: measured here). ``run``: the config to run (None: nothing), and
    whether only its throughput is measured (``measure_only``); ``loss_layout_from``: the trial whose
    faster layout trains this config's loss (None: its own)."""

    throughput_from: int | None
    loss_from: int | None
    run: TrialConfig | None
    loss_layout_from: int | None = None

    @property
    def measure_only(self) -> bool:
        return self.run is not None and self.run.run.measure_only


def plan(config: TrialConfig, trials: list[dict[str, Any]]) -> Plan:
    """How to get ``config``'s values, given the study's ok trials as :func:`measured_records` gives them."""
    t_key, l_key = throughput_key(config), loss_key(config)
    sources = [t for t in trials if t["throughput_key"] == t_key and t["measured"].get("throughput") == "here"]
    tput = next((t for t in sources if t["whole_s"] is not None), sources[0] if sources else None)  # a whole run first
    loss = next((t for t in trials if l_key is not None and t["loss_key"] == l_key
                 and t["measured"].get("loss") in ("here", "layout")), None) if l_key else None
    if tput is not None and loss is not None:
        return Plan(tput["number"], loss["number"], None)
    if loss is not None:  # a new system: its throughput only
        return Plan(None, loss["number"], replace(config, run=replace(config.run, measure_only=True)))
    if tput is not None and l_key is not None and tput["whole_s"] is not None:
        # A new loss on a known system: train it on the layout whose whole trial took least wall time for the
        # same global batch, precision and kernels (the same steps), when that is quicker than this config's
        # own. Wall time, not throughput: a faster layout on more processes can cost more to start than it saves.
        same = _same_batch_precision_kernels(config)
        quickest = min((t for t in trials if t["same"] == same and t["whole_s"] is not None),
                       key=lambda t: t["whole_s"], default=None)
        if quickest is not None and quickest["whole_s"] < tput["whole_s"]:
            faster = system_of(TrialConfig.from_dict(quickest["config"]), config)
            return Plan(tput["number"], None, faster, loss_layout_from=quickest["number"])
    return Plan(None, None, config)


def _same_batch_precision_kernels(config: TrialConfig) -> str:
    flat = config.flat()
    return _key({k: flat[k] for k in ("global_batch_size", "precision", "mlp_kernel", "cross_entropy_kernel",
                                      "layernorm_kernel")})


def measured_records(trials: list[Any]) -> list[dict[str, Any]]:
    """The study's ok trials as :func:`plan` reads them (Optuna FrozenTrials in, plain records out)."""
    out = []
    for t in trials:
        a = t.user_attrs
        if a.get("status") != "ok" or not a.get("config"):
            continue
        config = TrialConfig.from_dict(a["config"])
        measured = a.get("measured") or {"throughput": "here", "loss": "here"}
        whole = measured.get("throughput") == "here" and measured.get("loss") == "here"
        out.append({
            "number": t.number, "config": a["config"], "throughput_key": throughput_key(config),
            "loss_key": loss_key(config), "same": _same_batch_precision_kernels(config),
            "tokens_per_second": float(a["metrics"]["tokens_per_second"]), "measured": measured,
            # The wall time of a whole trial of its own config (None when its run was not one).
            "whole_s": float((a.get("phase_seconds") or {}).get("process_wall", 0.0)) or None if whole else None,
        })
    return out


def run_planned(p: Plan, run: Callable[[TrialConfig], TrialResult],
                measured_in: Callable[[int], TrialResult]) -> tuple[TrialResult, dict[str, Any]]:
    """Carry out plan ``p``: ``run`` runs a config, ``measured_in(n)`` is trial n's recorded result.
    Returns the proposed config's result and where its values were measured (``measured``:
    ``throughput`` and ``loss`` are "here", a trial number, or for a loss trained here on another
    trial's faster layout, "layout" with ``loss_layout_from``)."""
    if p.run is None:
        tput, loss = measured_in(p.throughput_from), measured_in(p.loss_from)
        return compose(tput, loss, {}), {"throughput": p.throughput_from, "loss": p.loss_from}
    result = run(p.run)
    if p.measure_only:
        if result.status != "ok":
            return result, {"throughput": "here", "loss": p.loss_from}
        return compose(result, measured_in(p.loss_from), result.phase_seconds), \
            {"throughput": "here", "loss": p.loss_from}
    if p.throughput_from is None:
        return result, {"throughput": "here", "loss": "here"}
    where = {"throughput": p.throughput_from, "loss": "layout", "loss_layout_from": p.loss_layout_from}
    tput = measured_in(p.throughput_from)
    if result.status == "ok":
        return compose(tput, result, result.phase_seconds), where
    # Stopped or failed where its loss was trained: the throughput it is recorded with is still its own.
    result.metrics = with_throughput(result.metrics, tput.metrics)
    return result, where


def with_throughput(metrics: dict[str, Any], measured: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with the throughput and memory of ``measured`` (another run of the same system knobs)."""
    return {**metrics, **{k: measured[k] for k in THROUGHPUT_METRICS if k in measured}}


def compose(tput: TrialResult, loss: TrialResult, phases: dict[str, float]) -> TrialResult:
    """An ok result with ``tput``'s throughput and memory, ``loss``'s loss and curve, and ``phases`` (what ran here)."""
    metrics = {k: tput.metrics[k] for k in THROUGHPUT_METRICS if k in tput.metrics}
    metrics.update({k: loss.metrics[k] for k in LOSS_METRICS if k in loss.metrics})
    return TrialResult("ok", metrics=metrics, loss_curve=list(loss.loss_curve), phase_seconds=dict(phases))
