"""One trial: build the workload, train it for the token budget, measure, return a TrialResult.

The measurement rules are DESIGN.md's: throughput over steady-state steps only, each
timed after a device synchronise; validation loss on fixed held-out windows after a
fixed *token* budget; the allocator's (GPU) or the process's (CPU) peak memory; MFU
from 6N + 12·L·d·T FLOPs per token over a peak FLOP/s whose source is recorded.
A diverged, out-of-memory or unrunnable config is a result, not an exception; any
other exception propagates (the runner classifies it as a crash).
"""

from __future__ import annotations

import math
import time
import traceback
from pathlib import Path

import numpy as np
import torch

# torch.optim imports torch._dynamo when the first optimizer is built (~1.5 s on a small CPU);
# importing it here, with torch, counts that fixed cost in start_and_import, not in model_build.
import torch._dynamo  # noqa: F401
import torch.distributed as dist

from cotune import hardware, tiles
from cotune.config import PRECISIONS, OptimizerConfig, TrialConfig, TrialResult
from cotune.data import open_splits, prepare_data
from cotune.errors import UserError
from cotune.trial import distributed, measure
from cotune.trial.batches import Masking
from cotune.trial.distributed import Dist
from cotune.trial.loss_scale import DynamicLossScaler
from cotune.trial.parallelize import Parallel, parallelize
from cotune.trial.trainer import PipelineLoss, Trainer, cross_entropy
from cotune.trial.workloads import apply_activation_checkpointing, build_workload

MAX_CURVE_POINTS = 200
PROFILE_STEPS = 3


def run_trial(
    config: TrialConfig,
    *,
    cache_dir: Path,
    trace_dir: Path | None = None,
    own_process: bool = False,
    kernel_cache: Path | None = None,
) -> TrialResult:
    """Train ``config``'s workload for its token budget and measure it.

    ``cache_dir`` holds prepared data and the peak-FLOP/s probe; ``trace_dir``, if given,
    receives the Chrome trace of a profiled run. ``own_process`` says the process was
    started for this trial alone (``python -m cotune.trial``), so ``start_and_import``
    counts from process creation; otherwise it is 0. ``kernel_cache`` is the JSON file of
    Triton kernel timings shared by a study's trials.
    """
    phases = {"start_and_import": measure.process_age_s() if own_process else 0.0}
    reason = infeasible_reason(config)
    if reason:
        return TrialResult("infeasible", reason=reason, phase_seconds=phases)
    d = distributed.init(config)
    try:
        result = _run(config, d, Path(cache_dir), trace_dir if d.rank == 0 else None, phases, kernel_cache)
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
    if par.sequence_parallel and (par.tp == 1 or config.workload.seq_len % par.tp):
        raise ValueError(
            "sequence_parallel needs tp > 1 and seq_len % tp == 0, but got "
            f"tp={par.tp}, seq_len={config.workload.seq_len}"
        )
    if run.device == "cuda":
        if not torch.cuda.is_available():
            return "device cuda was asked for, but torch sees no CUDA device here"
        if torch.cuda.device_count() < par.world_size:
            return (f"world_size <= GPU count must hold, but got world_size={par.world_size}, "
                    f"GPUs={torch.cuda.device_count()}")
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
    kernel_cache: Path | None,
) -> TrialResult:
    run, wl = config.run, config.workload
    device = d.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t = time.perf_counter()
    data = prepare_data(wl.data, cache_dir, seq_len=wl.seq_len, tokenizer=wl.tokenizer, text_field=wl.data_field)
    if data.vocab_size > wl.vocab_size:
        raise UserError(
            f"workload.vocab_size >= the data's vocabulary must hold, but got "
            f"vocab_size={wl.vocab_size} for {data.source} with vocabulary {data.vocab_size}"
        )
    train_tokens, val_tokens = open_splits(data)
    phases["data"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(run.seed)  # weights: every rank builds the same full model, then takes its part
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
    trainer = Trainer(config, par, d, train_tokens, scaler, train_loss, masking, pipeline_loss)
    phases["model_build"] = time.perf_counter() - t

    tokens_per_step = config.batch.global_batch_size * wl.seq_len
    budget_steps = math.ceil(run.token_budget / tokens_per_step)
    timed = range(run.warmup_steps, run.warmup_steps + run.measured_steps)
    total_steps = max(budget_steps, timed.stop)  # extra steps (after the val loss) only for timing
    flops_per_token = measure.flops_per_token(n_params, wl)
    metrics: dict = {"n_params": n_params, "flops_per_token": flops_per_token, "budget_steps": budget_steps}
    curve: list[list[float]] = []
    step_times: list[float] = []
    val_loss = math.nan
    for name in ("warmup", "measured", "rest_and_eval"):
        phases[name] = 0.0

    for step in range(total_steps):
        t_iter = time.perf_counter()
        phase = "warmup" if step < timed.start else "measured" if step in timed else "rest_and_eval"
        lr = learning_rate_at(step, config.optimizer, budget_steps)
        sync()
        t0 = time.perf_counter()
        loss_t = trainer.step(lr)
        sync()
        step_time = time.perf_counter() - t0
        loss = loss_t.item()
        if step in timed:
            step_times.append(step_time)
        if step < budget_steps:
            curve.append([step + 1, (step + 1) * tokens_per_step, loss])
        phases[phase] += time.perf_counter() - t_iter
        if not math.isfinite(loss):
            return TrialResult(
                "diverged",
                metrics={**metrics, "train_steps": step + 1, "tokens_trained": (step + 1) * tokens_per_step},
                loss_curve=measure.subsample(curve, MAX_CURVE_POINTS),
                phase_seconds=phases,
                reason=f"training loss became {loss} at step {step + 1} of {total_steps} (learning rate {lr:.3g})",
            )
        if step + 1 == budget_steps:
            t = time.perf_counter()
            val_loss = trainer.evaluate(val_tokens)
            phases["rest_and_eval"] += time.perf_counter() - t

    peak_memory, memory_source = measure.peak_memory(device)
    if d.world_size > 1:  # the slowest rank sets the pace; the fullest rank sets the memory need
        *step_times, peak_memory = d.max([*step_times, float(peak_memory)])
        peak_memory = int(peak_memory)
    tokens_per_second = len(step_times) * tokens_per_step / sum(step_times)
    t = time.perf_counter()
    achieved = flops_per_token * tokens_per_second / config.parallel.world_size  # per device
    peak_flops, peak_source = hardware.peak_flops(run.device, config.precision.precision, cache_dir,
                                                  at_least=achieved)
    phases["peak_flops"] = time.perf_counter() - t
    metrics.update(
        tokens_per_second=tokens_per_second,
        val_loss=val_loss,
        step_time_mean_s=float(np.mean(step_times)),
        step_time_std_s=float(np.std(step_times, ddof=1)) if len(step_times) > 1 else 0.0,
        peak_memory_bytes=peak_memory,
        peak_memory_source=memory_source,
        mfu=flops_per_token * tokens_per_second / (peak_flops * config.parallel.world_size),
        peak_flops=peak_flops,
        peak_flops_source=peak_source,
        train_steps=total_steps,
        tokens_trained=budget_steps * tokens_per_step,
    )
    result = TrialResult(
        "ok", metrics=metrics, loss_curve=measure.subsample(curve, MAX_CURVE_POINTS), phase_seconds=phases
    )
    if not math.isfinite(val_loss):
        result.status = "diverged"
        result.reason = f"validation loss is {val_loss} after {budget_steps} steps"
        return result

    if config.kernels.selected() and d.rank == 0:
        from cotune.trial.kernels.timing import time_kernels

        t = time.perf_counter()
        result.kernel_timings = time_kernels(config, device, kernel_cache)
        phases["kernel_timing"] = time.perf_counter() - t
    if config.kernels.selected() and d.world_size > 1:
        dist.barrier()  # the other ranks wait here while rank 0 times the kernels

    if run.profile:
        t = time.perf_counter()
        floor_lr = learning_rate_at(budget_steps, config.optimizer, budget_steps)
        result.profile_top_ops, result.trace_path = measure.profile_steps(
            lambda: trainer.step(floor_lr), device, PROFILE_STEPS, trace_dir
        )
        phases["profile"] = time.perf_counter() - t
    return result
