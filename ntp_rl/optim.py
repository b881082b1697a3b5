"""AdamW and the learning-rate schedules (warmup-stable-decay as in the paper, cosine, constant)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ntp_rl.config.schema import Schedule


def build_adamw(model: torch.nn.Module, optim_cfg: Any, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; norms and biases are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                             fused=fused or None)


def lr_lambda(optim_cfg: Any, max_steps: int) -> Callable[[int], float]:
    """The multiplier of optim.lr after `step` optimizer steps (LambdaLR convention)."""
    schedule = optim_cfg.schedule
    warmup = int(optim_cfg.warmup_steps)
    floor = float(optim_cfg.min_lr_ratio)
    decay_steps = int(round(max_steps * float(optim_cfg.decay_fraction)))
    decay_start = max(max_steps - decay_steps, warmup)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule is Schedule.constant:
            return 1.0
        if schedule is Schedule.cosine:
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: flat after warmup, then a linear decay to the floor over the last steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress

    return multiplier
