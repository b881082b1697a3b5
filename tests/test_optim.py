"""The learning-rate schedules, value by value, and AdamW's parameter groups."""

import math

import pytest
import torch

from ntp_rl.config.schema import OptimConfig, Schedule
from ntp_rl.optim import build_adamw, lr_lambda


def multipliers(schedule: Schedule, max_steps: int, **kw) -> list[float]:
    fn = lr_lambda(OptimConfig(schedule=schedule, **kw), max_steps)
    return [fn(step) for step in range(max_steps)]


def test_warmup_stable_decay_by_hand():
    # 10 steps: 2 of warmup, flat, then the last 20% (2 steps from step 8) decay linearly to 0.1.
    got = multipliers(Schedule.wsd, 10, warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.1)
    assert got == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.55])
    # The floor is reached at max_steps, the step after the last one taken.
    assert lr_lambda(OptimConfig(warmup_steps=2, decay_fraction=0.2, min_lr_ratio=0.1), 10)(10) == pytest.approx(0.1)


def test_cosine_by_hand():
    got = multipliers(Schedule.cosine, 6, warmup_steps=2, min_lr_ratio=0.0)
    # after warmup: 0.5 * (1 + cos(pi * (step - 2) / 4))
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))])


def test_constant_and_no_warmup():
    assert multipliers(Schedule.constant, 5, warmup_steps=0) == [1.0] * 5
    assert multipliers(Schedule.constant, 5, warmup_steps=4) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_decay_never_starts_inside_warmup():
    # A decay share larger than what follows warmup starts right after warmup, never before it ends.
    got = multipliers(Schedule.wsd, 4, warmup_steps=3, decay_fraction=1.0, min_lr_ratio=0.0)
    assert got[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and got[3] == pytest.approx(1.0)


def test_the_scheduler_applies_it_to_the_optimizer():
    optimizer = build_adamw(torch.nn.Linear(2, 2), OptimConfig(lr=0.01), fused=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(OptimConfig(lr=0.01, warmup_steps=4), 100))
    seen = []
    for _ in range(3):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.0025, 0.005, 0.0075])


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decayed, plain = build_adamw(model, OptimConfig(weight_decay=0.1), fused=False).param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 3)]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3  # the Linear's bias, the norm's weight and bias
