"""Qwen3-MoE with the paper's router bias: the model class of a bias-balanced ntp-rl checkpoint.

Self-contained on purpose (torch and transformers only): `save_pretrained` copies this file
into every bias-balanced checkpoint and config.json names it in `auto_map`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` routes as ntp-rl trained
it, with nothing from ntp-rl installed. Its config has a model type of its own
(`ntp_rl_qwen3_moe`, a Qwen3-MoE config under another name) on purpose: transformers has no class
for it, so `from_pretrained(dir)` without `trust_remote_code` is refused with transformers' own
error asking for it, instead of building a Qwen3-MoE that drops `expert_bias` and routes without it.

`biased_topk` is the routing rule, the one place it is written: the trainer's router
(ntp_rl/moe.py), this class and the vLLM engine's model (ntp_rl/vllm_moe.py) all call it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeTopKRouter

ARCHITECTURE = "NtpRlQwen3MoeForCausalLM"
MODEL_TYPE = "ntp_rl_qwen3_moe"
BIAS = "expert_bias"


def biased_topk(router_logits: torch.Tensor, bias: torch.Tensor | None, top_k: int,
                norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert indices) of each token: the bias decides which experts (top-k of logits + bias), the
    weights are the unbiased softmax probabilities of those (renormalised over the k with `norm_topk_prob`).
    Weights are fp32; the caller casts them. Without a bias this is Qwen3-MoE's own rule."""
    probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
    if bias is None:
        weights, indices = torch.topk(probs, top_k, dim=-1)
    else:
        # On the logits, not the probabilities: DeepSeek-V3 adds its bias to sigmoid scores, which
        # vLLM's e_score_correction_bias implements; top-k of softmax + bias would choose differently.
        indices = torch.topk(router_logits.detach().float() + bias.float(), top_k, dim=-1).indices
        weights = probs.gather(-1, indices)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


class BiasedQwen3MoeTopKRouter(Qwen3MoeTopKRouter):
    """Qwen3-MoE's router choosing its top-k experts with `expert_bias` (a buffer: no gradient)."""

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        weights, indices = biased_topk(router_logits, getattr(self, BIAS, None), self.top_k, self.norm_topk_prob)
        return router_logits, weights.to(router_logits.dtype), indices


def add_bias(router: nn.Module) -> None:
    """Make a Qwen3-MoE router a biased one, with a zero bias unless it has one."""
    if not isinstance(router, BiasedQwen3MoeTopKRouter):
        router.__class__ = BiasedQwen3MoeTopKRouter
    if getattr(router, BIAS, None) is None:
        router.register_buffer(BIAS, torch.zeros(router.num_experts, device=router.weight.device), persistent=True)


class NtpRlQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE's config, under the model type only this file's class loads."""

    model_type = MODEL_TYPE


class NtpRlQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen3-MoE whose routers carry the bias, loaded from (and saved to) `...mlp.gate.expert_bias`."""

    config_class = NtpRlQwen3MoeConfig

    def __init__(self, config):
        super().__init__(config)
        for module in self.modules():
            if isinstance(module, Qwen3MoeTopKRouter):
                add_bias(module)


NtpRlQwen3MoeConfig.register_for_auto_class()
NtpRlQwen3MoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
