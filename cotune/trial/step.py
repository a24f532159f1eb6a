"""One optimizer step of a trial's model as this rank holds it, and the validation loss.

``Trainer`` owns the optimizer (AdamW, decay on matrices and embeddings only), the fp16
loss scaler, autocast and the batches: every rank draws the whole global batch (window
starts, and masks for masked LM) from the same seeded generator and takes its
data-parallel slice, so any layout trains on exactly the tokens one process would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cotune import hardware
from cotune.config import TrialConfig
from cotune.trial import batches, measure
from cotune.trial.distributed import Dist
from cotune.trial.loss_scale import DynamicLossScaler
from cotune.trial.parallelize import Parallel, clip_grad_norm, sync_tied_grads


class Trainer:
    """Model (as this rank holds it), optimizer, loss scaler and batches: ``step`` is one optimizer step."""

    def __init__(
        self, config: TrialConfig, par: Parallel, d: Dist, train_tokens: np.ndarray, scaler: DynamicLossScaler,
        train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], masking: batches.Masking | None = None,
        pipeline_loss: PipelineLoss | None = None,
    ) -> None:
        self.pipeline_loss = pipeline_loss  # the schedule's loss function, told each micro batch's target count
        self.config = config
        self.objective = config.workload.objective
        if self.objective == "masked_lm" and masking is None:
            raise ValueError("a masked_lm workload needs the tokenizer's mask token (Masking), but got None")
        self.masking = masking
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
            (lambda: torch.autocast(self.device.type, dtype=hardware.torch_dtype(precision)))
            if precision != "fp32"
            else contextlib.nullcontext
        )

    def batch(self, starts: np.ndarray, tokens: np.ndarray, seeds: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets, each (B, T) int64, for the windows starting at ``starts`` (the objective's;
        masked LM draws window i's masks from ``seeds[i]``)."""
        T = self.config.workload.seq_len
        if self.objective == "masked_lm":
            return batches.masked_lm(tokens, starts, T, seeds, self.masking)
        return batches.causal_lm(tokens, starts, T)

    def to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xy = torch.from_numpy(np.stack([x, y]))  # (2, B, T): one copy to the device
        if self.device.type == "cuda":
            xy = xy.pin_memory().to(self.device, non_blocking=True)
        return xy[0], xy[1]

    def step_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro batches for one step.

        The whole global batch of window starts (and, for masked LM, one mask seed per window) is
        drawn on every rank from the same seeded generator, and each data-parallel rank builds
        only its own contiguous slice, so any layout trains on exactly the tokens one process would.
        """
        b, T = self.config.batch, self.config.workload.seq_len
        span = T + batches.window_tokens(self.objective)
        starts = self.rng.integers(0, len(self.tokens) - span + 1, size=b.global_batch_size)
        seeds = batches.mask_seeds(self.rng, b.global_batch_size) if self.objective == "masked_lm" else None
        self.predicted: list[int] = []  # targets predicted in each micro batch (all of them for causal LM)
        lo = self.d.dp_index * b.micro_batch_size * b.grad_accum_steps
        out = []
        for k in range(b.grad_accum_steps):
            rows = slice(lo + k * b.micro_batch_size, lo + (k + 1) * b.micro_batch_size)
            x, y = self.batch(starts[rows], self.tokens, None if seeds is None else seeds[rows])
            # Counted on the host, from numpy: reading it off the device would sync inside the timed step.
            self.predicted.append(int((y != batches.IGNORE).sum()))
            out.append(self.to_device(x, y))
        return out

    def loss(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Training loss (mean); with reduction="sum", PyTorch's fp32 cross-entropy, for evaluation."""
        with self.autocast():
            logits = self.par.modules[0](x)  # (B, T, V)
        return self.train_loss(logits, y) if reduction == "mean" else cross_entropy(logits, y, reduction)

    def step(self, lr: float) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro batches; returns this rank's mean loss (0-d, on device).

        Nothing here waits on the device or talks to other ranks beyond what training itself
        needs (the layout's own collectives, the gradient norm): the loss is read later, for
        several steps at once, by :meth:`read_losses`.
        """
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.config.batch.grad_accum_steps
        total = torch.zeros((), device=self.device)
        for k, (x, y) in enumerate(self.step_batches()):
            if self.par.schedule is None:
                loss = self.loss(x, y)
                total = total + loss.detach()
                self.scaler.scale(loss / accum).backward()
            else:
                total = total + self._pipeline_step(x, y, self.predicted[k]) * accum
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
        return total / accum

    def read_losses(self, losses: list[torch.Tensor]) -> list[float]:
        """The training loss of each step in ``losses`` (this rank's, from :meth:`step`), as one process sees it:
        the mean over data-parallel ranks of the last pipeline stage's, read with one reduction for all of them."""
        if not losses:
            return []
        mine = torch.stack([t.float() for t in losses]).to(torch.float64)  # (steps,)
        if self.d.world_size == 1:
            return mine.tolist()
        return self.d.loss_means(mine)  # on this rank's device, as its backend wants

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor, predicted: int) -> torch.Tensor:
        """Forward and backward of one micro batch through the pipeline schedule.

        The schedule splits it into pp_microbatches; :class:`PipelineLoss` scales each one's
        loss so that they sum to the micro batch's mean / accum, as one process computes it.
        Returns this rank's mean loss / accum (0 off the last stage).
        """
        if self.pipeline_loss is not None:
            self.pipeline_loss.predicted = predicted
        losses: list[torch.Tensor] = []
        args = (x,) if self.par.has_first else ()
        target = y if self.par.has_last else None
        with self.autocast():
            self.par.schedule.step(*args, target=target, losses=losses)
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([t.detach().float() for t in losses]).sum() / self.scaler.value  # unscaled

    @torch.no_grad()
    def evaluate(self, val_tokens: np.ndarray, eval_tokens: int | None = None) -> float:
        """Mean cross-entropy over fixed, evenly spaced windows of the val split (nats per predicted token).

        The windows (and, for masked LM, their masks: a fixed seed) are the same in every trial
        of a study. Every data-parallel rank evaluates all windows; with pp > 1 the hidden
        states travel stage to stage by point-to-point sends. ``eval_tokens`` (default the run's)
        reads fewer: a rung's loss.
        """
        run, T = self.config.run, self.config.workload.seq_len
        starts = measure.eval_window_starts(len(val_tokens), T, eval_tokens or run.eval_tokens,
                                            batches.window_tokens(self.objective))
        seeds = batches.mask_seeds(np.random.default_rng(batches.EVAL_MASK_SEED), len(starts))
        x_all, y_all = self.batch(starts, val_tokens, seeds)
        for m in self.par.modules:
            m.eval()
        total, count = 0.0, 0
        mb = self.config.batch.micro_batch_size
        for i in range(0, len(starts), mb):
            x, y = self.to_device(x_all[i:i + mb], y_all[i:i + mb])
            if self.par.schedule is None:
                total += self.loss(x, y, reduction="sum").item()
            else:
                total += self._pipeline_forward_loss(x, y)
            count += int((y_all[i:i + mb] != batches.IGNORE).sum())
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
                out = cross_entropy(h, y, "sum").item()
        return out


class PipelineLoss:
    """The pipeline schedule's loss for one of the pp_microbatches chunks of a micro batch.

    The chunks' losses must add up to the micro batch's mean loss / grad_accum_steps, the
    gradient one process takes. For causal LM every chunk predicts as many tokens, so each
    is its mean / (chunks * accum). For masked LM the chunks predict different numbers of
    tokens, so each is its *sum* / (the micro batch's predicted tokens * accum), which the
    trainer sets before each micro batch; a mean per chunk would weight tokens unequally.
    """

    def __init__(self, config: TrialConfig, train_loss: Callable, scaler: DynamicLossScaler) -> None:
        self.masked = config.workload.objective == "masked_lm"
        self.accum = config.batch.grad_accum_steps
        self.chunks = config.parallel.pp_microbatches
        self.train_loss, self.scaler = train_loss, scaler
        self.predicted = 0  # targets predicted in the current micro batch (set by Trainer)

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.masked:
            loss = cross_entropy(out, target, "sum") / (max(1, self.predicted) * self.accum)
        else:
            loss = self.train_loss(out, target) / (self.chunks * self.accum)
        return self.scaler.scale(loss)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Over the targets that are not batches.IGNORE (all of them for causal LM, the masked ones for masked LM)."""
    # Cross-entropy in fp32 whatever the compute precision: a softmax over V in bf16 loses the loss.
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=batches.IGNORE, reduction=reduction)
