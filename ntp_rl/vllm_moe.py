"""vLLM's model for a bias-balanced Qwen3-MoE checkpoint: it routes exactly as the trainer does.

vLLM's own Qwen3-MoE cannot: its loader drops every unknown weight ending in `_bias` (so
`mlp.gate.expert_bias` never arrives), and its fused-MoE layer offers only
`e_score_correction_bias`, which is added to the softmax probabilities, not to the logits as
the trainer's rule has it (ntp_rl/modeling_biased_moe.py: `biased_topk`). This class is
vLLM's Qwen3-MoE with, in each MoE layer, an `expert_bias` parameter beside the router
weight and that rule as the layer's `custom_routing_function`.

Its `load_weights` takes what the trainer has in memory as well as what is on disk:
transformers 5 fuses each layer's experts (`mlp.experts.gate_up_proj` [E, 2I, H],
`mlp.experts.down_proj` [E, H, I]), the safetensors hold them per expert. A name it cannot
place is an error, never skipped.

`register()` puts the class in vLLM's registry under the architecture a bias checkpoint's
config.json names; it is also a vLLM plugin (pyproject's `vllm.general_plugins`), so a
`vllm serve <checkpoint>` next to an installed ntp-rl routes with the bias too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ntp_rl.modeling_biased_moe import ARCHITECTURE, BIAS, biased_topk

# Suffixes vLLM's Qwen3-MoE loader skips silently when the model has no such parameter.
_SKIPPED_SUFFIXES = (".bias", "_bias", ".weight_scale", "_weight_scale", ".input_scale", "_input_scale")


def register() -> None:
    """vLLM plugin entry point (lazy: nothing of vLLM's model code is imported here)."""
    from vllm import ModelRegistry

    from ntp_rl.moe import register_checkpoint_classes

    # vLLM reads config.json with transformers' AutoConfig, in every process it starts.
    register_checkpoint_classes()
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "ntp_rl.vllm_moe:NtpRlQwen3MoeForCausalLM")


class _BiasedRouting:
    """A layer's `custom_routing_function`: reads the bias from the layer's gate at every call, so a
    weight sync that copies into it is seen at once."""

    def __init__(self, gate: nn.Module):
        self.gate = gate

    def __call__(self, hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int,
                 renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        weights, indices = biased_topk(gating_output, getattr(self.gate, BIAS), topk, renormalize)
        return weights, indices.to(torch.int32)


def _split_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers 5's fused expert tensors as the per-expert weights of the checkpoint format."""
    prefix, _, kind = name.rpartition(".experts.")
    if kind == "gate_up_proj":
        half = tensor.shape[1] // 2
        for e, expert in enumerate(tensor.unbind(0)):
            yield f"{prefix}.experts.{e}.gate_proj.weight", expert[:half]
            yield f"{prefix}.experts.{e}.up_proj.weight", expert[half:]
    else:  # down_proj
        for e, expert in enumerate(tensor.unbind(0)):
            yield f"{prefix}.experts.{e}.down_proj.weight", expert


def _vllm_class() -> type:
    from vllm.model_executor.models import qwen3_moe

    class NtpRlQwen3MoeForCausalLM(qwen3_moe.Qwen3MoeForCausalLM):
        def __init__(self, *, vllm_config: Any, prefix: str = ""):
            build = qwen3_moe.FusedMoEFactory
            num_experts = vllm_config.model_config.hf_text_config.num_experts

            def with_bias(*args: Any, **kwargs: Any) -> Any:
                gate = kwargs["gate"]
                gate.register_parameter(BIAS, nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                           requires_grad=False))
                return build(*args, **kwargs, custom_routing_function=_BiasedRouting(gate))

            # vLLM's MoE block builds its fused-MoE layer inside its constructor, with no hook for the routing.
            qwen3_moe.FusedMoEFactory = with_bias
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                qwen3_moe.FusedMoEFactory = build

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            params = dict(self.named_parameters())
            sent: set[str] = set()

            def checked() -> Iterator[tuple[str, torch.Tensor]]:
                for name, tensor in weights:
                    sent.add(name)
                    if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                        yield from _split_experts(name, tensor)
                    elif name.endswith(_SKIPPED_SUFFIXES) and _stacked(name) not in params:
                        raise ValueError(f"the engine has no parameter for {name} (vLLM's loader would skip it)")
                    else:
                        yield name, tensor

            loaded = super().load_weights(checked())
            # A router that got its weight but not its bias would route with whatever the reload left there.
            missing = sorted(name.replace(".weight", f".{BIAS}") for name in sent
                             if name.endswith(".mlp.gate.weight") and name.replace(".weight", f".{BIAS}") not in sent)
            if missing:
                raise ValueError(f"the weights sent lack the router bias {missing[0]} (and {len(missing) - 1} more): "
                                 "send the model's saved buffers with its parameters")
            return loaded

    NtpRlQwen3MoeForCausalLM.__name__ = NtpRlQwen3MoeForCausalLM.__qualname__ = ARCHITECTURE
    return NtpRlQwen3MoeForCausalLM


def _stacked(name: str) -> str:
    for shard in ("q_proj", "k_proj", "v_proj"):
        name = name.replace(f".{shard}.", ".qkv_proj.")
    return name


def __getattr__(name: str) -> Any:
    # The registry's "ntp_rl.vllm_moe:NtpRlQwen3MoeForCausalLM": built on first use, after vLLM is imported.
    if name == ARCHITECTURE:
        cls = _vllm_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
