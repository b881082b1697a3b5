"""Expert load balancing for Qwen3-MoE models: the paper's bias (its appendix A.2) or HF's auxiliary loss.

Bias balancing (auxiliary-loss-free, as in DeepSeek-V3): each router carries a per-expert
bias that is added to its scores for choosing the top-k experts only; the gating weights
that mix the chosen experts stay the unbiased softmax. After each optimizer step the bias
moves by `rate` towards the experts that were under-used: bias += rate * sign(mean_load -
load). It is a buffer, never a parameter: no gradient, no optimizer, no weight decay.

The bias is added to the router's logits rather than its softmax probabilities: the top-k
of both is the same, and the logits' scale does not shrink with the number of experts, so one
rate (DeepSeek-V3's 1e-3) suits 4 experts and 384 alike.

It is saved as `...mlp.gate.expert_bias` in the checkpoint's safetensors, and config.json
says `moe_balancing: bias`; `load_pretrained` re-installs it. Plain
`AutoModelForCausalLM.from_pretrained` loads every weight and warns that the
`expert_bias` keys are unexpected: such a model routes without the bias.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.nn import functional as F

from ntp_rl.config.schema import MoeBalancing
from ntp_rl.errors import ConfigError

# config.json attributes that record how a checkpoint balances its experts
BALANCING_ATTR = "moe_balancing"
RATE_ATTR = "moe_bias_rate"
BIAS = "expert_bias"


def _router_class() -> type:
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    except ImportError as exc:  # transformers 4.x routes inside the sparse block, with no router module
        raise ConfigError("model.moe_balancing", "needs transformers >= 5 (its Qwen3-MoE has a router module): "
                          "pip install -U 'transformers>=5'") from exc
    return Qwen3MoeTopKRouter


def routers(lm: nn.Module) -> list[nn.Module]:
    """The MoE routers of `lm`, first layer first; none for a dense model."""
    if getattr(lm.config, "model_type", None) not in ("qwen3_moe",):
        return []
    router_cls = _router_class()
    return [m for m in lm.modules() if isinstance(m, router_cls)]


def _balanced_router_class() -> type:
    base = _router_class()

    class BalancedRouter(base):
        """Qwen3-MoE's router, counting each expert's load and choosing the top-k with `expert_bias` if it has one."""

        def forward(self, hidden_states: torch.Tensor):
            bias = getattr(self, BIAS, None)
            if bias is None:
                router_logits, router_scores, router_indices = super().forward(hidden_states)
            else:
                hidden_states = hidden_states.reshape(-1, self.hidden_dim)
                router_logits = F.linear(hidden_states, self.weight)
                router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
                # The bias decides which experts; the weights are the unbiased probabilities of those.
                router_indices = torch.topk(router_logits.detach().float() + bias, self.top_k, dim=-1).indices
                router_scores = router_probs.gather(-1, router_indices)
                if self.norm_topk_prob:
                    router_scores = router_scores / router_scores.sum(dim=-1, keepdim=True)
                router_scores = router_scores.to(router_logits.dtype)
            if torch.is_grad_enabled():
                # The tokens trained on: validation, sampling and RL's old log-probs run without gradients.
                # Gradient checkpointing runs this twice per step: every count doubles, the balance does not change.
                with torch.no_grad():
                    load = torch.bincount(router_indices.reshape(-1), minlength=self.num_experts).float()
                    self.expert_load = load if self.expert_load is None else self.expert_load + load
            return router_logits, router_scores, router_indices

    return BalancedRouter


def install(lm: nn.Module, balancing: MoeBalancing, rate: float = 0.0) -> None:
    """Count expert load on every router of an MoE `lm` and set its balancing; a dense model is left alone."""
    found = routers(lm)
    if not found:
        return
    balanced_cls = _balanced_router_class()
    for router in found:
        device = router.weight.device
        router.__class__ = balanced_cls
        # A plain attribute, not a buffer: DDP would overwrite every process's counts with the first one's.
        router.expert_load = None
        if balancing is MoeBalancing.bias and getattr(router, BIAS, None) is None:
            router.register_buffer(BIAS, torch.zeros(router.num_experts, device=device), persistent=True)
        elif balancing is not MoeBalancing.bias and BIAS in router._buffers:
            del router._buffers[BIAS]
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


def reinstall_from(lm: nn.Module, model_dir: str) -> None:
    """Re-install the balancing a checkpoint was saved with, with its saved expert biases."""
    balancing = checkpoint_balancing(lm)
    if balancing is None:
        return
    install(lm, balancing, getattr(lm.config, RATE_ATTR, 0.0))
    if balancing is not MoeBalancing.bias:
        return
    saved = _saved_biases(Path(model_dir))
    for name, buffer in lm.named_buffers():
        if name.endswith(BIAS) and name in saved:
            buffer.copy_(saved[name].to(buffer))


class _OnlyBiasReport(logging.Filter):
    """Drop transformers' load report when the expert biases (re-installed next) are all it lists."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines()[1:] if "|" in line and not line.startswith(("Key", "-"))]
        return not rows or not all(BIAS in row for row in rows)


@contextmanager
def quiet_bias_report() -> Iterator[None]:
    """While loading a checkpoint: its `expert_bias` keys are expected here, whatever transformers says."""
    hf_logger = logging.getLogger("transformers.modeling_utils")
    only_bias = _OnlyBiasReport()
    hf_logger.addFilter(only_bias)
    try:
        yield
    finally:
        hf_logger.removeFilter(only_bias)


def _saved_biases(model_dir: Path) -> dict[str, torch.Tensor]:
    """The `expert_bias` tensors of a local checkpoint's safetensors files (one file or shards)."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(BIAS):
                    found[key] = handle.get_tensor(key)
    return found


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
        bias = getattr(router, BIAS, None)
        if bias is not None and stepped:
            bias += rate * torch.sign(layer_mean - load)
        router.expert_load = None
    metrics = {"moe/load_imbalance": imbalance.item()}
    biases = [router.expert_bias for router in found if getattr(router, BIAS, None) is not None]
    if biases:
        metrics["moe/bias_abs_max"] = torch.stack(biases).abs().max().item()
    return metrics
