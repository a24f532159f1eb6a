"""Dynamic loss scaling for fp16, one decision for every rank.

fp16's narrow range underflows small gradients, so the loss is multiplied by a large
scale before backward and the gradients divided by it after. On overflow (a gradient
inf or NaN) the step is skipped and the scale halved; after ``growth_interval`` clean
steps it is doubled: ``torch.amp.GradScaler``'s rule and defaults. Unlike GradScaler,
overflow is read from the global gradient norm, which gradient clipping reduces over
every rank anyway, so with sharded or pipelined gradients all ranks skip the same
steps (a rank that stepped alone would leave the replicas apart).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor


class DynamicLossScaler:
    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.enabled = enabled
        self.value = init_scale if enabled else 1.0
        self.growth_interval = growth_interval
        self._clean_steps = 0
        self.skipped = 0  # optimizer steps skipped on overflow, for the record

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.value if self.enabled else loss

    def unscale_(self, params: list[torch.nn.Parameter]) -> None:
        """Divide every gradient by the scale, in place (before clipping reads them)."""
        if not self.enabled:
            return
        inv = 1.0 / self.value
        for p in params:
            if p.grad is not None:
                (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(inv)

    def update(self, grad_norm: float) -> bool:
        """Adjust the scale from this step's global gradient norm; True if the optimizer may step."""
        if not self.enabled:
            return True
        if not math.isfinite(grad_norm):
            self.value *= 0.5
            self._clean_steps = 0
            self.skipped += 1
            return False
        self._clean_steps += 1
        if self._clean_steps == self.growth_interval:
            self.value *= 2.0
            self._clean_steps = 0
        return True
