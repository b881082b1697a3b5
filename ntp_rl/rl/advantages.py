"""Advantage estimators: rewards of one prompt's G samples -> one advantage per sample.

A registry keyed by name (`rl.advantage`), as verl's `adv_estimator`: an estimator takes one
`AdvantageInputs` record and the rl config (`GRPOConfig`), so a new one needs nothing but
`@register_advantage("name")` and the fields it reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class AdvantageInputs:
    rewards: torch.Tensor  # [groups, G]: the rewards of each prompt's G samples


AdvantageFn = Callable[[AdvantageInputs, Any], torch.Tensor]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn

    return wrap


def compute_advantages(inputs: AdvantageInputs, rl: Any) -> torch.Tensor:
    """[groups, G] advantages from the estimator `rl.advantage` names."""
    rewards = inputs.rewards
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G >= 2], got shape {tuple(rewards.shape)}")
    return ADVANTAGES[rl.advantage](inputs, rl)


@register_advantage("grpo")
def grpo(inputs: AdvantageInputs, rl: Any) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group; with rl.scale_rewards=false only r - mean (Dr. GRPO).

    std is the unbiased sample std, as in TRL and verl. A group whose rewards are all equal
    gets zero advantages either way: it carries no signal about which sample was better.
    """
    rewards = inputs.rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not rl.scale_rewards:
        return centred
    std = rewards.std(dim=1, keepdim=True)
    # where, not a bare division: with eps = 0 an equal-reward group would be 0 / 0
    return torch.where(std > 0, centred / (std + rl.advantage_eps), torch.zeros_like(centred))


@register_advantage("rloo")
def rloo(inputs: AdvantageInputs, rl: Any) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): r_i minus the mean of the group's other G - 1 rewards.

    The baseline of a sample never includes its own reward, so the estimate is unbiased;
    it equals G / (G - 1) x (r - mean) and is never divided by the group's spread.
    """
    rewards = inputs.rewards.float()
    group = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)
    return rewards - others_mean
