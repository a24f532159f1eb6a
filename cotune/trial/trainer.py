"""One optimizer step of a trial's model as this rank holds it, and the validation loss.

``Trainer`` owns the optimizer (AdamW, decay on matrices and embeddings only), the fp16
loss scaler, autocast and the batches: every rank draws the whole global batch of
window starts from the same seeded generator and takes its data-parallel slice, so any
layout trains on exactly the tokens one process would.
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
from cotune.trial import measure
from cotune.trial.distributed import Dist
from cotune.trial.loss_scale import DynamicLossScaler
from cotune.trial.parallelize import Parallel, clip_grad_norm, sync_tied_grads


class Trainer:
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
            (lambda: torch.autocast(self.device.type, dtype=hardware.torch_dtype(precision)))
            if precision != "fp32"
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
        return self.train_loss(logits, y) if reduction == "mean" else cross_entropy(logits, y, reduction)

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
                out = cross_entropy(h, y, "sum").item()
        return out


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # Cross-entropy in fp32 whatever the compute precision: a softmax over V in bf16 loses the loss.
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)
