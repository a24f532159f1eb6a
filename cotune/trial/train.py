"""One trial: build the workload, train it for the token budget, measure, return a TrialResult.

The measurement rules are DESIGN.md's: throughput over steady-state steps only, each
timed after a device synchronise; validation loss on fixed held-out windows after a
fixed *token* budget; the allocator's (GPU) or the process's (CPU) peak memory; MFU
from 6N + 12·L·d·T FLOPs per token over a peak FLOP/s whose source is recorded.
A diverged, out-of-memory or unrunnable config is a result, not an exception; any
other exception propagates (the runner classifies it as a crash).
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

# torch.optim imports torch._dynamo when the first optimizer is built (~1.5 s on a small CPU);
# importing it here, with torch, counts that fixed cost in start_and_import, not in model_build.
import torch._dynamo  # noqa: F401
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cotune import hardware, tiles
from cotune.config import PRECISIONS, OptimizerConfig, TrialConfig, TrialResult
from cotune.data import open_splits, prepare_data
from cotune.errors import UserError
from cotune.trial import distributed, measure
from cotune.trial.distributed import Dist
from cotune.trial.loss_scale import DynamicLossScaler
from cotune.trial.parallelize import Parallel, clip_grad_norm, parallelize, sync_tied_grads
from cotune.trial.workloads import apply_activation_checkpointing, build_model

MAX_CURVE_POINTS = 200
PROFILE_STEPS = 3
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        return _run(config, d, Path(cache_dir), trace_dir if d.rank == 0 else None, phases, kernel_cache)
    except Exception as e:  # MemoryError and torch.OutOfMemoryError are Exceptions too
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
    finally:
        distributed.shutdown(d)


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


class _Trainer:
    """Model (as this rank holds it), optimizer, loss scaler and batches: ``step`` is one optimizer step."""

    def __init__(
        self, config: TrialConfig, par: Parallel, d: Dist, train_tokens: np.ndarray, scaler: DynamicLossScaler,
        train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> None:
        self.config = config
        self.train_loss = train_loss  # mean over tokens; PyTorch's or the Triton kernel's
        self.d = d
        self.device = d.device
        self.par = par
        self.tokens = train_tokens
        self.rng = np.random.default_rng(config.run.seed)  # the batch order; apart from torch's init RNG
        opt = config.optimizer
        params = [p for p in par.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(
            [
                # Decay matrices and embeddings only; biases and LayerNorm gains stay undecayed.
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=opt.learning_rate,
            betas=(opt.adam_beta1, opt.adam_beta2),
            fused=self.device.type == "cuda" and d.world_size == 1,
        )
        precision = config.precision.precision
        self.scaler = scaler  # fp16 only; otherwise a pass-through
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(self.device.type, dtype=_DTYPES[precision]))
            if precision in _DTYPES
            else contextlib.nullcontext
        )

    def windows(self, starts: np.ndarray, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T) int64, for windows starting at ``starts``."""
        T = self.config.workload.seq_len
        xy = torch.from_numpy(tokens[starts[:, None] + np.arange(T + 1)].astype(np.int64))  # (B, T+1)
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro batches for one step.

        The whole global batch of window starts is drawn on every rank from the same seeded
        generator, and each data-parallel rank takes its own contiguous slice, so any layout
        trains on exactly the tokens one process would.
        """
        b, T = self.config.batch, self.config.workload.seq_len
        starts = self.rng.integers(0, len(self.tokens) - T, size=b.global_batch_size)  # a window needs T + 1
        local = b.micro_batch_size * b.grad_accum_steps
        mine = starts[self.d.dp_index * local:(self.d.dp_index + 1) * local]
        return [self.windows(mine[k * b.micro_batch_size:(k + 1) * b.micro_batch_size], self.tokens)
                for k in range(b.grad_accum_steps)]

    def loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Training loss (mean); with reduction="sum", PyTorch's fp32 cross-entropy, for evaluation."""
        with self.autocast():
            logits = self.par.modules[0](x)  # (B, T, V)
        return self.train_loss(logits, y) if reduction == "mean" else _cross_entropy(logits, y, reduction)

    def step(self, lr: float) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro batches; returns their mean loss (a 0-d tensor).

        With several ranks the returned loss is the mean over data-parallel ranks, taken
        from the last pipeline stage, and identical on every rank.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.config.batch.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for x, y in self.step_batches():
            if self.par.schedule is None:
                loss = self.loss(x, y)
                total = total + loss.detach()
                self.scaler.scale(loss / accum).backward()
            else:
                total = total + self._pipeline_step(x, y) * accum
        self.scaler.unscale_(self.params)  # clip the true gradients, not the scaled ones
        if self.d.world_size == 1:
            norm = nn.utils.clip_grad_norm_(self.params, self.config.optimizer.grad_clip)
        else:
            sync_tied_grads(self.par)
            norm = clip_grad_norm(self.par, self.config.optimizer.grad_clip, self.d)
        # Only fp16 reads the norm back (a device sync); False: its gradients overflowed, every rank skips.
        if not self.scaler.enabled or self.scaler.update(float(norm)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean = total / accum
        if self.d.world_size > 1:
            mean = torch.tensor(self.d.loss_mean(mean.item()))
        return mean

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro batch through the pipeline schedule.

        The schedule splits it into pp_microbatches; the loss function divides each one's
        mean by pp_microbatches * grad_accum_steps, so the gradients sum to the micro
        batch's mean. Returns this rank's mean loss / accum (0 off the last stage).
        """
        losses: list[torch.Tensor] = []
        args = (x,) if self.par.has_first else ()
        target = y if self.par.has_last else None
        with self.autocast():
            self.par.schedule.step(*args, target=target, losses=losses)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([t.detach().float() for t in losses]).sum() / self.scaler.value  # unscaled

    @torch.no_grad()
    def evaluate(self, val_tokens: np.ndarray) -> float:
        """Mean cross-entropy over fixed, evenly spaced seq_len windows of the val split (nats/token).

        Every data-parallel rank evaluates all windows (the same set in every layout); with
        pp > 1 the hidden states travel stage to stage by point-to-point sends.
        """
        run, T = self.config.run, self.config.workload.seq_len
        starts = measure.eval_window_starts(len(val_tokens), T, run.eval_tokens)
        for m in self.par.modules:
            m.eval()
        total, count = 0.0, 0
        for i in range(0, len(starts), self.config.batch.micro_batch_size):
            x, y = self.windows(starts[i : i + self.config.batch.micro_batch_size], val_tokens)
            if self.par.schedule is None:
                total += self.loss(x, y, reduction="sum").item()
            else:
                total += self._pipeline_forward_loss(x, y)
            count += y.numel()
        for m in self.par.modules:
            m.train()
        return self.d.loss_mean(total / count) if self.d.world_size > 1 else total / count

    def _pipeline_forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Summed loss of one batch through the stages in order (0 on ranks off the last stage)."""
        group, pp = self.d.group("pp"), self.d.pp_size
        par = self.config.parallel
        T = x.shape[1] // par.tp if par.sequence_parallel else x.shape[1]  # this rank's positions
        hidden = (x.shape[0], T, self.config.workload.n_embd)
        out = 0.0
        for stage in range(self.par.num_stages):
            if stage not in self.par.stage_ids:
                continue
            module = self.par.modules[self.par.stage_ids.index(stage)]
            if stage == 0:
                inp = x
            else:
                inp = torch.empty(hidden, dtype=torch.float32, device=self.device)
                dist.recv(inp, group=group, group_src=(stage - 1) % pp)
            with self.autocast():
                h = module(inp)
            if stage < self.par.num_stages - 1:
                dist.send(h.float().contiguous(), group=group, group_dst=(stage + 1) % pp)
            else:
                out = _cross_entropy(h, y, "sum").item()
        return out


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Cross-entropy in fp32 whatever the compute precision: a softmax over V in bf16 loses the loss.
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)


def _run(
    config: TrialConfig, d: Dist, cache_dir: Path, trace_dir: Path | None, phases: dict[str, float],
    kernel_cache: Path | None,
) -> TrialResult:
    run, wl = config.run, config.workload
    device = d.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    t = time.perf_counter()
    data = prepare_data(wl.data, cache_dir, seq_len=wl.seq_len)
    if data.vocab_size > wl.vocab_size:
        raise UserError(
            f"workload.vocab_size >= the data's vocabulary must hold, but got "
            f"vocab_size={wl.vocab_size} for {data.source} with vocabulary {data.vocab_size}"
        )
    train_tokens, val_tokens = open_splits(data)
    phases["data"] = time.perf_counter() - t

    t = time.perf_counter()
    torch.manual_seed(run.seed)  # weights: every rank builds the same full model, then takes its part
    model = build_model(wl)
    if config.kernels.selected():  # imports triton: only trials that run a kernel pay for it
        from cotune.trial.kernels.apply import apply_kernels, cross_entropy_loss

        apply_kernels(model, config.kernels)
        train_loss = cross_entropy_loss(config.kernels) or _cross_entropy
    else:
        train_loss = _cross_entropy
    n_params = model.n_params() if hasattr(model, "n_params") else sum(p.numel() for p in model.parameters())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the peak from here on: weights, activations, optimizer state
    model.to(device)
    scaler = DynamicLossScaler(enabled=config.precision.precision == "fp16")
    if d.world_size == 1:
        if config.software.activation_checkpointing:
            apply_activation_checkpointing(model)  # before compile, so compile traces the wrapped blocks
        if config.software.compile:
            model = torch.compile(model)  # compiles lazily: the cost lands in the warm-up steps
        par = Parallel(modules=[model], stage_ids=[0], num_stages=1)
    else:
        parts = config.batch.grad_accum_steps * (config.parallel.pp_microbatches if config.parallel.pp > 1 else 1)
        par = parallelize(model, config, d, loss_fn=lambda out, tgt: scaler.scale(train_loss(out, tgt) / parts))
        del model  # pipelined, the stages are copies: the unsplit model would only hold memory
    trainer = _Trainer(config, par, d, train_tokens, scaler, train_loss)
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
