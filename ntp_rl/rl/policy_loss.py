"""Policy losses per token, and how they are averaged into the loss that is differentiated.

A registry keyed by name (`rl.policy_loss`), as verl's: a loss takes one `PolicyLossInputs`
record and the rl config (`GRPOConfig`). Everything here is a pure function of
[batch, tokens] tensors and a response mask, checked on hand-computed cases in tests/test_rl.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ntp_rl.config.schema import LossAggregation

# exp() of a larger log-ratio overflows fp32; ratios that far out are clipped anyway.
_MAX_LOG_RATIO = 20.0


@dataclass
class PolicyLossInputs:
    logp: torch.Tensor  # [B, T] log-probs of the sampled tokens under the policy being updated
    old_logp: torch.Tensor  # [B, T] the same under the policy that sampled them
    advantages: torch.Tensor  # [B] one per sequence


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [B, T] per-token loss (mask not applied)
    low_clipped: torch.Tensor  # [B, T] bool: ratio < 1 - eps_low where A < 0 (the clip stops the gradient)
    high_clipped: torch.Tensor  # [B, T] bool: ratio > 1 + eps_high where A > 0


PolicyLossFn = Callable[[PolicyLossInputs, Any], PolicyLossOutput]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return wrap


@register_policy_loss("ppo_clip")
def ppo_clip(inputs: PolicyLossInputs, rl: Any) -> PolicyLossOutput:
    """PPO's clipped surrogate with asymmetric bounds (DAPO's clip-higher).

    loss = max(-A r, -A clip(r, 1 - rl.clip_eps_low, 1 + rl.clip_eps_high)), r = pi / pi_old per
    token and A the sequence's advantage. A wider upper bound lets unlikely tokens of good
    samples grow faster, which keeps the policy's entropy from collapsing early.
    """
    eps_low, eps_high = rl.clip_eps_low, rl.clip_eps_high
    ratio = torch.exp((inputs.logp - inputs.old_logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
    adv = inputs.advantages.unsqueeze(-1).to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    return PolicyLossOutput(
        loss=torch.maximum(unclipped, clipped),
        low_clipped=(ratio < 1 - eps_low) & (adv < 0),
        high_clipped=(ratio > 1 + eps_high) & (adv > 0),
    )


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref) on samples from pi: exp(d) - d - 1, d = log pi_ref - log pi.

    Unbiased, never negative, and of lower variance than the plain log-ratio (Schulman 2020).
    """
    d = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def aggregation_count(mask: torch.Tensor, mode: LossAggregation) -> torch.Tensor:
    """What the loss is averaged over: response tokens (token_mean) or responses with a token (seq_mean).

    Counted on each process and summed over processes by the caller, so the average is over
    the global batch whatever the number of processes.
    """
    if mode is LossAggregation.token_mean:
        return mask.sum().float()
    return (mask.sum(-1) > 0).sum().float()


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: LossAggregation, count: torch.Tensor | float) -> torch.Tensor:
    """Sum of this batch's share of the average: token_mean sums tokens, seq_mean sums per-response means.

    Divided by `count` (from aggregation_count, over the whole global batch), so summing the
    result over micro-batches and processes gives the global average. A batch with nothing to
    average over (count 0: every response masked) sums to 0, not 0 / 0.
    """
    total = torch.where(mask, values, torch.zeros_like(values))  # a masked-out NaN must not leak in
    count = torch.as_tensor(count, dtype=values.dtype, device=values.device).clamp_min(1)
    if mode is LossAggregation.token_mean:
        return total.sum() / count
    return (total.sum(-1) / mask.sum(-1).clamp_min(1)).sum() / count
