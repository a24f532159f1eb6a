"""fp16's dynamic loss scaler: GradScaler's rule, decided from the global gradient norm."""

from __future__ import annotations

import math

import torch

from cotune.trial.loss_scale import DynamicLossScaler


def test_overflow_skips_the_step_and_halves_the_scale():
    s = DynamicLossScaler(enabled=True, init_scale=1024.0, growth_interval=3)
    assert s.update(math.inf) is False and s.value == 512.0
    assert s.update(math.nan) is False and s.value == 256.0
    assert s.skipped == 2


def test_clean_steps_grow_the_scale_after_the_interval():
    s = DynamicLossScaler(enabled=True, init_scale=8.0, growth_interval=3)
    assert [s.update(1.0) for _ in range(3)] == [True, True, True]
    assert s.value == 16.0
    s.update(math.inf)  # an overflow restarts the count
    assert [s.update(1.0) for _ in range(2)] == [True, True] and s.value == 8.0


def test_scale_then_unscale_gives_the_true_gradient():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    s = DynamicLossScaler(enabled=True, init_scale=2.0**10)
    s.scale((w * torch.tensor([3.0, 5.0])).sum()).backward()
    assert w.grad.tolist() == [3.0 * 1024, 5.0 * 1024]
    s.unscale_([w])
    assert w.grad.tolist() == [3.0, 5.0]


def test_disabled_is_a_pass_through():
    s = DynamicLossScaler(enabled=False)
    loss = torch.tensor(2.5)
    assert s.scale(loss) is loss and s.update(math.inf) is True and s.value == 1.0
