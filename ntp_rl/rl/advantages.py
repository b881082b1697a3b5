"""Advantage estimators: rewards of one prompt's G samples -> one advantage per sample.

A registry keyed by name (`rl.advantage`), as verl's `adv_estimator`: add an estimator with
`@register_advantage("name")`; it receives rewards shaped [groups, G].
"""

from __future__ import annotations

from typing import Callable

import torch

ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {}


def register_advantage(name: str) -> Callable:
    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        ADVANTAGES[name] = fn
        return fn

    return wrap


@register_advantage("grpo")
def grpo(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group; with scale=False only r - mean (Dr. GRPO).

    std is the unbiased sample std, as in TRL and verl. A group whose rewards are all equal
    gets zero advantages either way: it carries no signal about which sample was better.
    """
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    # where, not a bare division: with eps = 0 an equal-reward group would be 0 / 0
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def compute_advantages(name: str, rewards: torch.Tensor, scale: bool, eps: float) -> torch.Tensor:
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G >= 2], got shape {tuple(rewards.shape)}")
    return ADVANTAGES[name](rewards, scale=scale, eps=eps)
