"""One trial: build the workload, train it for the token budget, measure, return a TrialResult.

The measurement rules are DESIGN.md's: throughput over steady-state steps only, each
timed after a device synchronise; validation loss on fixed held-out windows after a
fixed *token* budget; the allocator's peak memory (GPU) or the process's anonymous peak (CPU:
heap and tensors, not the memory-mapped corpus); MFU
from 6N + 12·L·d·T FLOPs per token over a peak FLOP/s whose source is recorded.
A diverged, out-of-memory or unrunnable config is a result, not an exception; any
other exception propagates (the runner classifies it as a crash).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# torch.optim imports torch._dynamo when the first optimizer is built (~1.5 s on a small CPU);
# importing it here, with torch, counts that fixed cost in start_and_import, not in model_build.
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from cotune import hardware, tiles
from cotune.config import PRECISIONS, OptimizerConfig, TrialConfig, TrialResult
from cotune.data import DataInfo, open_splits, prepare_data
from cotune.errors import UserError
from cotune.trial import distributed, measure
from cotune.trial.batches import Masking
from cotune.trial.distributed import Dist
from cotune.trial.loss_scale import DynamicLossScaler
from cotune.trial.parallelize import Parallel, parallelize
from cotune.trial.step import PipelineLoss, Trainer, cross_entropy
from cotune.trial.workloads import apply_activation_checkpointing, build_workload

MAX_CURVE_POINTS = 200
PROFILE_STEPS = 3
RUNG_EVAL_SHARE = 4  # a rung's validation loss reads 1/4 of the final evaluation's tokens


def train_and_measure(
    config: TrialConfig,
    *,
    cache_dir: Path,
    trace_dir: Path | None = None,
    own_process: bool = False,
    kernel_cache: Path | None = None,
    progress_path: Path | None = None,
) -> TrialResult:
    """Train ``config``'s workload for its token budget and measure it.

    ``cache_dir`` holds prepared data and the peak-FLOP/s probe; ``trace_dir``, if given,
    receives the Chrome trace of a profiled run. ``own_process`` says the process was
    started for this trial alone (``python -m cotune.trial``), so ``start_and_import``
    counts from process creation; otherwise it is 0. ``kernel_cache`` is the JSON file of
    Triton kernel timings shared by a study's trials. ``progress_path``, if given, gets one JSON
    line per rung (:func:`rung_record`) as the trial reaches it, for a search that may stop it there.
    """
    phases = {"start_and_import": measure.process_age_s() if own_process else 0.0}
    reason = infeasible_reason(config)
    if reason:
        return TrialResult("infeasible", reason=reason, phase_seconds=phases)
    d = distributed.init(config)
    try:
        result = _run(config, d, Path(cache_dir), trace_dir if d.rank == 0 else None, phases, kernel_cache,
                      progress_path)
    except Exception as e:  # MemoryError and torch.OutOfMemoryError are Exceptions too
        # No shutdown on a failure: tearing the process group down first would make the other ranks
        # fail (a closed connection) before this rank has said why. The process exits right after.
        if tiles.is_out_of_resources(e):  # only Triton's compiler could tell: the tiles do not fit this GPU
            return TrialResult("infeasible", phase_seconds=phases, error_tail=str(e)[-2000:],
                               reason=f"Triton tiles do not fit the device: {str(e).splitlines()[0][:300]}")
        if not measure.is_oom(e):
            raise
        tail = "".join(traceback.format_exception(e)).strip().splitlines()[-12:]
        return TrialResult(
            "oom",
            phase_seconds=phases,
            error_tail="\n".join(tail),
            reason=f"out of memory: {type(e).__name__}" + (f" on rank {d.rank}" if d.world_size > 1 else ""),
        )
    result = d.from_rank0(result)
    distributed.shutdown(d)
    return result


def infeasible_reason(config: TrialConfig) -> str:
    """Why this machine cannot run ``config`` at all ("" if it can). Bad values raise ValueError."""
    run, batch, par = config.run, config.batch, config.parallel
    precision = config.precision.precision
    if run.device not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be 'cpu' or 'cuda', but got {run.device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, but got {precision!r}")
    if batch.micro_batch_size * batch.grad_accum_steps * par.data_parallel != batch.global_batch_size:
        raise ValueError(
            "micro_batch_size * grad_accum_steps * (dp * fsdp) == global_batch_size must hold, but got "
            f"micro_batch_size={batch.micro_batch_size}, grad_accum_steps={batch.grad_accum_steps}, "
            f"dp={par.dp}, fsdp={par.fsdp}, global_batch_size={batch.global_batch_size}"
        )
    if run.measured_steps < 1 or run.warmup_steps < 0 or run.token_budget < 1 or run.eval_tokens < 1:
        raise ValueError(
            "measured_steps >= 1, warmup_steps >= 0, token_budget >= 1 and eval_tokens >= 1 must hold, but got "
            f"measured_steps={run.measured_steps}, warmup_steps={run.warmup_steps}, "
            f"token_budget={run.token_budget}, eval_tokens={run.eval_tokens}"
        )
    if config.budget_steps < run.warmup_steps + run.measured_steps:
        raise ValueError(
            "token_budget / (global_batch_size * seq_len) >= warmup_steps + measured_steps must hold, but got "
            f"{config.budget_steps} steps, warmup_steps={run.warmup_steps}, measured_steps={run.measured_steps}"
        )
    if par.sequence_parallel and (par.tp == 1 or config.workload.seq_len % par.tp):
        raise ValueError(
            "sequence_parallel needs tp > 1 and seq_len % tp == 0, but got "
            f"tp={par.tp}, seq_len={config.workload.seq_len}"
        )
    if run.device == "cuda":
        if not torch.cuda.is_available():
            return "device cuda was asked for, but torch sees no CUDA device here"
        per_node = par.world_size // run.nnodes
        if torch.cuda.device_count() < per_node:
            return (f"world_size / nnodes <= GPU count must hold, but got world_size={par.world_size}, "
                    f"nnodes={run.nnodes}, GPUs={torch.cuda.device_count()}")
        major, minor = torch.cuda.get_device_capability()
        if precision == "bf16" and major < 8:
            return f"bf16 needs a GPU of CUDA capability 8.0 or newer, but this one is {major}.{minor}"
    return ""


def learning_rate_at(step: int, opt: OptimizerConfig, budget_steps: int) -> float:
    """Linear warm-up over round(warmup_fraction * budget_steps) steps, then cosine to 10% at budget_steps."""
    warmup = round(opt.warmup_fraction * budget_steps)
    peak, floor = opt.learning_rate, 0.1 * opt.learning_rate
    if step < warmup:
        return peak * (step + 1) / warmup
    if step >= budget_steps:
        return floor  # timing-only steps past the budget
    progress = (step - warmup) / max(1, budget_steps - warmup)  # 0 -> 1
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def _run(
    config: TrialConfig, d: Dist, cache_dir: Path, trace_dir: Path | None, phases: dict[str, float],
    kernel_cache: Path | None, progress_path: Path | None = None,
) -> TrialResult:
    """The trial's phases: data, model and layout, training (timed window inside), measurement, extras."""
    t = time.perf_counter()
    data, train_tokens, val_tokens = _load_data(config, cache_dir)
    phases["data"] = time.perf_counter() - t
    # CPU: the anonymous peak from here on (the data mapped, not read; building a corpus on a cache miss
    # is not the model's memory)
    host_memory = measure.HostMemory() if d.device.type == "cpu" else None

    t = time.perf_counter()
    trainer, n_params = build_trainer(config, d, data, train_tokens)
    phases["model_build"] = time.perf_counter() - t

    flops_per_token = measure.flops_per_token(n_params, config.workload)
    # What this rank ran on: the cores it may use and torch's threads (with --jobs, the job's share of the machine).
    metrics: dict = {"n_params": n_params, "flops_per_token": flops_per_token, "budget_steps": config.budget_steps,
                     "cpu_cores": len(os.sched_getaffinity(0)), "cpu_threads": torch.get_num_threads()}
    def on_rung(rung: int, so_far: TrainingRun, loss: float) -> None:
        measured = _measure(config, d, so_far, flops_per_token, cache_dir, host_memory)  # collective: every rank
        record = d.from_rank0(rung_record(config, rung, so_far, loss, {**metrics, **measured}, phases))
        if d.reporter and progress_path is not None:
            with open(progress_path, "a") as f:  # one whole line per write: the reader takes complete lines
                f.write(json.dumps(record) + "\n")

    run = train(config, trainer, val_tokens, phases, host_memory,
                on_rung=on_rung if config.run.rung_fractions and progress_path is not None else None)
    if run.diverged or config.run.measure_only:
        metrics.update(train_steps=run.steps, tokens_trained=run.steps * config.batch.global_batch_size
                       * config.workload.seq_len)
        curve = measure.subsample(run.curve, MAX_CURVE_POINTS)
        if run.diverged:
            return TrialResult("diverged", metrics=metrics, loss_curve=curve, phase_seconds=phases, reason=run.diverged)
        t = time.perf_counter()  # throughput and memory only: no validation loss to take
        measured = _measure(config, d, run, flops_per_token, cache_dir, host_memory)
        phases["peak_flops"] = time.perf_counter() - t
        measured.pop("val_loss")
        return TrialResult("ok", metrics={**measured, **metrics}, loss_curve=curve, phase_seconds=phases)

    t = time.perf_counter()
    metrics.update(_measure(config, d, run, flops_per_token, cache_dir, host_memory))
    if trainer.scaler.enabled:  # optimizer steps fp16 skipped on overflow (every rank skips the same ones)
        metrics["fp16_skipped_steps"] = trainer.scaler.skipped
    phases["peak_flops"] = time.perf_counter() - t
    result = TrialResult(
        "ok", metrics=metrics, loss_curve=measure.subsample(run.curve, MAX_CURVE_POINTS), phase_seconds=phases
    )
    if not math.isfinite(run.val_loss):
        result.status = "diverged"
        result.reason = f"validation loss is {run.val_loss} after {config.budget_steps} steps"
        return result
    _extras(config, d, trainer, result, trace_dir, kernel_cache)
    return result


def rung_record(config: TrialConfig, rung: int, so_far: TrainingRun, loss: float, metrics: dict,
                phases: dict[str, float]) -> dict:
    """What a trial says at a rung: where it is, the rung's loss, and the metrics a stopped trial keeps
    (throughput and memory from the timed window, which ended before the first rung)."""
    tokens = so_far.steps * config.batch.global_batch_size * config.workload.seq_len
    kept = {k: v for k, v in metrics.items() if k != "val_loss"}  # a rung's loss is not the budget's
    kept.update(rung_val_loss=loss, train_steps=so_far.steps, tokens_trained=tokens)
    return {"rung": rung, "step": so_far.steps, "tokens": tokens, "val_loss": loss, "metrics": kept,
            "phase_seconds": dict(phases), "loss_curve": measure.subsample(so_far.curve, MAX_CURVE_POINTS)}


def _load_data(config: TrialConfig, cache_dir: Path) -> tuple[DataInfo, np.ndarray, np.ndarray]:
    wl = config.workload
    data = prepare_data(wl.data, cache_dir, seq_len=wl.seq_len, tokenizer=wl.tokenizer, text_field=wl.data_field)
    if data.vocab_size > wl.vocab_size:
        raise UserError(
            f"workload.vocab_size >= the data's vocabulary must hold, but got "
            f"vocab_size={wl.vocab_size} for {data.source} with vocabulary {data.vocab_size}"
        )
    train_tokens, val_tokens = open_splits(data)
    return data, train_tokens, val_tokens


def build_trainer(config: TrialConfig, d: Dist, data: DataInfo, train_tokens: np.ndarray) -> tuple[Trainer, int]:
    """The workload built, its kernels swapped in, laid out on this rank, with its optimizer: a Trainer, and N."""
    wl, device = config.workload, d.device
    torch.manual_seed(config.run.seed)  # weights: every rank builds the same full model, then takes its part
    workload = build_workload(wl)
    model = workload.model
    if config.kernels.selected():  # imports triton: only trials that run a kernel pay for it
        from cotune.trial.kernels.apply import apply_kernels, cross_entropy_loss

        apply_kernels(model, config.kernels)
        train_loss = cross_entropy_loss(config.kernels) or cross_entropy
    else:
        train_loss = cross_entropy
    n_params = workload.count_params()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak from here on: weights, activations, optimizer state
    model.to(device)
    scaler = DynamicLossScaler(enabled=config.precision.precision == "fp16")
    pipeline_loss = None
    if d.world_size == 1:
        if config.software.activation_checkpointing:
            apply_activation_checkpointing(workload.layer_list())  # before compile, so compile traces the wrapped layers
        if config.software.compile:
            model = torch.compile(model)  # compiles lazily: the cost lands in the warm-up steps
        par = Parallel(modules=[model], stage_ids=[0], num_stages=1)
    else:
        pipeline_loss = PipelineLoss(config, train_loss, scaler)
        par = parallelize(workload, config, d, loss_fn=pipeline_loss)
        del model, workload  # pipelined, the stages are copies: the unsplit model would only hold memory
    masking = None
    if wl.objective == "masked_lm":
        if data.mask_id is None:
            raise UserError(f"a masked_lm workload needs a tokenizer with a mask token, but {data.source} has none")
        masking = Masking(mask_id=data.mask_id, vocab_size=data.vocab_size, special_ids=tuple(data.special_ids))
    return Trainer(config, par, d, train_tokens, scaler, train_loss, masking, pipeline_loss), n_params


@dataclass
class TrainingRun:
    """What training to the token budget produced."""

    curve: list[list[float]] = field(default_factory=list)  # [step, tokens seen, train loss]
    step_times: list[float] = field(default_factory=list)  # seconds of each timed step on this rank
    val_loss: float = math.nan
    steps: int = 0
    diverged: str = ""  # why, if the training loss stopped being finite


def rung_steps(config: TrialConfig) -> dict[int, int]:
    """The steps after which the trial reports a rung, each with its rung's index in ``run.rung_fractions``.

    Rung i comes after ceil(fraction_i * budget_steps) steps, the same share of the token budget in every
    trial, so rung losses compare. A rung the timed window has not ended by is skipped (a rung reports the
    throughput, and nothing may run inside the window), as is one at the last step (the trial's own loss).
    """
    run, budget = config.run, config.budget_steps
    window_end = run.warmup_steps + run.measured_steps
    steps = {math.ceil(f * budget): i for i, f in enumerate(run.rung_fractions)}
    return {s: i for s, i in sorted(steps.items()) if window_end <= s < budget}


def rung_eval_tokens(config: TrialConfig) -> int:
    """Held-out tokens of a rung's loss: a quarter of the final evaluation's (at least one window).
    Every trial of a study takes the same windows at a rung, so rung losses compare among themselves."""
    return max(config.workload.seq_len, config.run.eval_tokens // RUNG_EVAL_SHARE)


def train(config: TrialConfig, trainer: Trainer, val_tokens: np.ndarray, phases: dict[str, float],
          host_memory: measure.HostMemory | None = None,
          on_rung: Callable[[int, TrainingRun, float], None] | None = None) -> TrainingRun:
    """Train to the token budget, timing steps [warmup_steps, warmup_steps + measured_steps), then evaluate.

    The timed window holds training steps and nothing else, in every layout: each step is
    timed between device synchronisations, and the losses it produced stay on the device
    until the window ends, when one reduction over the ranks reads them all (outside the
    window they are read after every step). The validation loss is taken after the last
    step; the budget holds the timed window (a rule checked before launch). ``host_memory``
    (CPU) takes a checkpoint wherever the losses are read, never between two timed steps.
    After each of :func:`rung_steps` the loss on :func:`rung_eval_tokens` held-out tokens goes
    to ``on_rung(rung_index, run_so_far, rung_loss)`` (outside the timed window, which ends before).
    With ``run.measure_only`` the steps stop at the window's end (on the budget's learning-rate
    schedule, so each step costs what it would) and no validation loss is taken.
    """
    run, device = config.run, trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens_per_step = config.batch.global_batch_size * config.workload.seq_len
    budget_steps = config.budget_steps  # the schedule's length, also when only the timed window runs
    timed = range(run.warmup_steps, run.warmup_steps + run.measured_steps)
    out = TrainingRun()
    pending: list[torch.Tensor] = []  # this rank's losses not read yet
    rungs = rung_steps(config) if on_rung is not None and not run.measure_only else {}
    for name in ("warmup", "measured", "rest", *(["rung_eval"] if rungs else []), *([] if run.measure_only else ["eval"])):
        phases[name] = 0.0
    for step in range(timed.stop if run.measure_only else budget_steps):
        t_iter = time.perf_counter()
        lr = learning_rate_at(step, config.optimizer, budget_steps)
        sync()
        t0 = time.perf_counter()
        pending.append(trainer.step(lr))
        sync()
        if step in timed:
            out.step_times.append(time.perf_counter() - t0)
        if step + 1 not in timed:  # never between two timed steps: read after the window's last
            first = step + 1 - len(pending)
            for k, loss in enumerate(trainer.read_losses(pending)):
                out.curve.append([first + k + 1, (first + k + 1) * tokens_per_step, loss])
                if not math.isfinite(loss) and not out.diverged:
                    out.diverged = (f"training loss became {loss} at step {first + k + 1} of {budget_steps} "
                                    f"(learning rate {learning_rate_at(first + k, config.optimizer, budget_steps):.3g})")
            pending.clear()
            if host_memory is not None:
                host_memory.checkpoint()
        phase = "warmup" if step < timed.start else "measured" if step in timed else "rest"
        phases[phase] += time.perf_counter() - t_iter
        out.steps = step + 1
        if out.diverged:
            return out
        if step + 1 in rungs:
            t = time.perf_counter()
            loss = trainer.evaluate(val_tokens, rung_eval_tokens(config))
            phases["rung_eval"] += time.perf_counter() - t
            on_rung(rungs[step + 1], out, loss)
    if run.measure_only:
        return out
    t = time.perf_counter()
    out.val_loss = trainer.evaluate(val_tokens)
    phases["eval"] = time.perf_counter() - t
    return out


def _measure(config: TrialConfig, d: Dist, run: TrainingRun, flops_per_token: int, cache_dir: Path,
             host_memory: measure.HostMemory | None = None) -> dict:
    """Throughput (the slowest rank's steps), peak memory (the fullest rank's), MFU; the loss is the run's."""
    step_times = run.step_times
    memory = measure.peak_memory(d.device, host_memory)
    byte_keys = sorted(k for k, v in memory.items() if isinstance(v, int))  # the same keys on every rank
    if d.world_size > 1:  # the slowest rank sets the pace; the fullest rank sets each memory figure
        maxima = d.max([*step_times, *(float(memory[k]) for k in byte_keys)])  # float64: bytes stay exact
        step_times = maxima[: len(step_times)]
        memory.update({k: int(v) for k, v in zip(byte_keys, maxima[len(step_times):], strict=True)})
    tokens_per_step = config.batch.global_batch_size * config.workload.seq_len
    tokens_per_second = len(step_times) * tokens_per_step / sum(step_times)
    # The cached figure, never raised here (a search replaces it with its study's, one for every trial).
    peak_flops, peak_source = hardware.peak_flops(config.run.device, config.precision.precision, cache_dir)
    return {
        "tokens_per_second": tokens_per_second,
        "val_loss": run.val_loss,
        "step_time_mean_s": float(np.mean(step_times)),
        "step_time_std_s": float(np.std(step_times, ddof=1)) if len(step_times) > 1 else 0.0,
        **memory,  # peak_memory_bytes, peak_memory_source and the device's second figure
        "mfu": flops_per_token * tokens_per_second / (peak_flops * config.parallel.world_size),
        "peak_flops": peak_flops,
        "peak_flops_source": peak_source,
        "train_steps": run.steps,
        "tokens_trained": config.budget_steps * tokens_per_step,
    }


def _extras(config: TrialConfig, d: Dist, trainer: Trainer, result: TrialResult, trace_dir: Path | None,
            kernel_cache: Path | None) -> None:
    """After measuring: each Triton kernel timed alone, and the profiler pass, if asked for."""
    phases = result.phase_seconds
    if config.kernels.selected() and d.rank == 0:
        from cotune.trial.kernels.timing import time_kernels

        t = time.perf_counter()
        result.kernel_timings = time_kernels(config, d.device, kernel_cache)
        phases["kernel_timing"] = time.perf_counter() - t
    if config.kernels.selected() and d.world_size > 1:
        dist.barrier()  # the other ranks wait here while rank 0 times the kernels
    if config.run.profile:
        t = time.perf_counter()
        floor_lr = learning_rate_at(config.budget_steps, config.optimizer, config.budget_steps)
        result.profile_top_ops, result.trace_path = measure.profile_steps(
            lambda: trainer.step(floor_lr), d.device, PROFILE_STEPS, trace_dir
        )
        phases["profile"] = time.perf_counter() - t
