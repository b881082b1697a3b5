"""Expert load balancing for Qwen3-MoE models: the paper's bias (its appendix A.2) or HF's auxiliary loss.

Bias balancing (auxiliary-loss-free, as in DeepSeek-V3): each router carries a per-expert
bias that is added to its scores for choosing the top-k experts only; the gating weights
that mix the chosen experts stay the unbiased softmax. After each optimizer step the bias
moves by `rate` towards the experts that were under-used: bias += rate * sign(mean_load -
load). It is a buffer, never a parameter: no gradient, no optimizer, no weight decay.

The bias is added to the router's logits rather than its softmax probabilities: the top-k
of both is the same, and the logits' scale does not shrink with the number of experts, so one
rate (DeepSeek-V3's 1e-3) suits 4 experts and 384 alike.

It is saved as `...mlp.gate.expert_bias` in the checkpoint's safetensors; config.json says
`moe_balancing: bias`, has the model type `ntp_rl_qwen3_moe` and names
ntp_rl/modeling_biased_moe.py (copied beside the weights) as the config and model classes, so
`load_pretrained`, `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` and the
vLLM engine (ntp_rl/vllm_moe.py) all route with it, from a directory or a hub id. Plain
`from_pretrained(dir)` is refused by transformers, which knows no class for that model type and
asks for `trust_remote_code=True`. Checkpoints saved before that model type (`qwen3_moe` with
`moe_balancing: bias`) still load with their biases here (`model_class`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ntp_rl.config.schema import MoeBalancing
from ntp_rl.errors import ConfigError

# config.json attributes that record how a checkpoint balances its experts
BALANCING_ATTR = "moe_balancing"
RATE_ATTR = "moe_bias_rate"


def is_qwen3_moe(config: object) -> bool:
    """A Qwen3-MoE config: transformers' own, or a bias-balanced checkpoint's (its own model type)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen3_moe":
        return True
    from ntp_rl.modeling_biased_moe import MODEL_TYPE

    return model_type == MODEL_TYPE


def register_checkpoint_classes() -> None:
    """Let transformers' Auto classes load a bias checkpoint's model type with ntp-rl's classes (the same code
    its directory holds), so ntp-rl's loaders need no remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ntp_rl.modeling_biased_moe import MODEL_TYPE, NtpRlQwen3MoeConfig, NtpRlQwen3MoeForCausalLM

    AutoConfig.register(MODEL_TYPE, NtpRlQwen3MoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(NtpRlQwen3MoeConfig, NtpRlQwen3MoeForCausalLM, exist_ok=True)


def _router_class() -> type:
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    except ImportError as exc:  # transformers 4.x routes inside the sparse block, with no router module
        raise ConfigError("model.moe_balancing", "needs transformers >= 5 (its Qwen3-MoE has a router module): "
                          "pip install -U 'transformers>=5'") from exc
    return Qwen3MoeTopKRouter


def routers(lm: nn.Module) -> list[nn.Module]:
    """The MoE routers of `lm`, first layer first; none for a dense model."""
    if not is_qwen3_moe(lm.config):
        return []
    router_cls = _router_class()
    return [m for m in lm.modules() if isinstance(m, router_cls)]


def _balanced_router_class() -> type:
    _router_class()  # the transformers check, before the module that needs it is imported
    from ntp_rl.modeling_biased_moe import BiasedQwen3MoeTopKRouter

    class BalancedRouter(BiasedQwen3MoeTopKRouter):
        """The checkpoint's router (biased if it has an `expert_bias`), counting each expert's load."""

        def forward(self, hidden_states: torch.Tensor):
            router_logits, router_scores, router_indices = super().forward(hidden_states)
            if torch.is_grad_enabled():
                # The tokens trained on: validation, sampling and RL's old log-probs run without gradients.
                # Gradient checkpointing runs this twice per step: every count doubles, the balance does not change.
                with torch.no_grad():
                    chosen = router_indices if self.token_mask is None else router_indices[self.token_mask.reshape(-1)]
                    load = torch.bincount(chosen.reshape(-1), minlength=self.num_experts).float()
                    self.expert_load = load if self.expert_load is None else self.expert_load + load
            return router_logits, router_scores, router_indices

    return BalancedRouter


def install(lm: nn.Module, balancing: MoeBalancing, rate: float = 0.0) -> None:
    """Count expert load on every router of an MoE `lm` and set its balancing; a dense model is left alone."""
    found = routers(lm)
    if not found:
        return
    from transformers import Qwen3MoeForCausalLM

    from transformers import Qwen3MoeConfig

    from ntp_rl.modeling_biased_moe import BIAS, NtpRlQwen3MoeConfig, NtpRlQwen3MoeForCausalLM, add_bias

    balanced_cls = _balanced_router_class()
    for router in found:
        if balancing is MoeBalancing.bias:
            add_bias(router)
        elif BIAS in router._buffers:
            del router._buffers[BIAS]
        router.__class__ = balanced_cls
        # Plain attributes, not buffers: DDP would overwrite every process's counts with the first one's.
        router.expert_load = None
        router.token_mask = None
    # The class save_pretrained records: with the bias, the one that loads it back (config.json's auto_map).
    # And the config's model type: a bias checkpoint's own, which plain transformers refuses to load.
    if isinstance(lm, Qwen3MoeForCausalLM):
        lm.__class__ = NtpRlQwen3MoeForCausalLM if balancing is MoeBalancing.bias else Qwen3MoeForCausalLM
        lm.config.__class__ = NtpRlQwen3MoeConfig if balancing is MoeBalancing.bias else Qwen3MoeConfig
    # HF's forward adds its load-balancing loss only when asked for the router logits.
    lm.config.output_router_logits = balancing is MoeBalancing.aux_loss
    setattr(lm.config, BALANCING_ATTR, balancing.value)
    setattr(lm.config, RATE_ATTR, float(rate))


def checkpoint_balancing(lm: nn.Module) -> Optional[MoeBalancing]:
    """How a loaded MoE checkpoint was balanced: recorded by ntp-rl, else HF's loss if its config asks for it."""
    if not routers(lm):
        return None
    recorded = getattr(lm.config, BALANCING_ATTR, None)
    if recorded:
        return MoeBalancing(recorded)
    return MoeBalancing.aux_loss if getattr(lm.config, "output_router_logits", False) else MoeBalancing.none


def reinstall_from(lm: nn.Module) -> None:
    """Count load on a loaded checkpoint's routers, with the balancing it was saved with (its biases came
    with its weights)."""
    balancing = checkpoint_balancing(lm)
    if balancing is not None:
        install(lm, balancing, getattr(lm.config, RATE_ATTR, 0.0))


def model_class(config: object) -> Optional[type]:
    """The class that loads a checkpoint with this config faithfully, where transformers' own would not:
    a bias-balanced Qwen3-MoE's saved under transformers' model type (before it had its own)."""
    if getattr(config, "model_type", None) == "qwen3_moe" and getattr(config, BALANCING_ATTR, None) == MoeBalancing.bias.value:
        _router_class()
        from ntp_rl.modeling_biased_moe import NtpRlQwen3MoeForCausalLM

        return NtpRlQwen3MoeForCausalLM
    return None


def count_only(lm: nn.Module, mask: Optional[torch.Tensor]) -> None:
    """The routers count the load of the positions where `mask` [batch, seq] is true (real tokens, not
    padding) in the forwards that follow, and in a gradient checkpoint's recomputation of them."""
    for router in routers(lm):
        router.token_mask = mask


@torch.no_grad()
def after_step(lm: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor], stepped: bool) -> dict[str, float]:
    """The step's expert-load imbalance (max / mean load, averaged over layers); then, with bias balancing and an
    update taken, move each bias towards even load. `reduce` sums the counts over processes, so every process
    moves its biases alike. The counts start again from zero."""
    found = routers(lm)
    if not found:
        return {}
    device = found[0].weight.device
    loads = reduce(torch.stack([torch.zeros(router.num_experts, device=device) if router.expert_load is None
                                else router.expert_load.to(device) for router in found]))
    if not loads.sum() > 0:  # nothing was routed with gradients: no measurement, and no update
        return {}
    mean = loads.mean(dim=-1, keepdim=True)
    imbalance = (loads.max(dim=-1).values / mean.squeeze(-1)).mean()
    rate = float(getattr(lm.config, RATE_ATTR, 0.0))
    for router, load, layer_mean in zip(found, loads, mean):
        bias = getattr(router, "expert_bias", None)
        if bias is not None and stepped:
            bias += rate * torch.sign(layer_mean - load)
        router.expert_load = None
    metrics = {"moe/load_imbalance": imbalance.item()}
    biases = [router.expert_bias for router in found if getattr(router, "expert_bias", None) is not None]
    if biases:
        metrics["moe/bias_abs_max"] = torch.stack(biases).abs().max().item()
    return metrics
