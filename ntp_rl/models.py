"""Models: Qwen3-family presets built from config, or any Hugging Face causal LM.

Every model is a plain `transformers` model, so a checkpoint directory loads with
`AutoModelForCausalLM.from_pretrained(dir)` and nothing from this package.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ntp_rl import moe
from ntp_rl.config.schema import LossImpl, ModelArch, MoeBalancing
from ntp_rl.errors import ConfigError, DataError, first_line
from ntp_rl.lm_head import has_plain_linear_head
from ntp_rl.losses import LossOutput, RewardShaping, shaped_ntp_loss, shaped_ntp_loss_fused, shaped_ntp_loss_reference


def build_model(model_cfg: Any, vocab_size: int, pad_token_id: int | None, eos_token_id: int | None,
                empty: bool = False) -> nn.Module:
    """A freshly initialised model from a preset, or the pretrained weights of model.name_or_path; `empty`: its
    shape only, on the meta device (FSDP's processes other than the first: sharding.shard fills them)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    arch = model_cfg.arch
    if arch is ModelArch.hf:
        lm = load_pretrained(model_cfg.name_or_path, key="model.name_or_path", attn_implementation=model_cfg.attn_implementation,
                             rope_theta=model_cfg.rope_theta, max_position_embeddings=model_cfg.max_position_embeddings,
                             empty=empty)
        set_balancing(lm, model_cfg)
        return lm

    common = dict(
        vocab_size=model_cfg.vocab_size or vocab_size,
        hidden_size=model_cfg.hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads,
        head_dim=model_cfg.head_dim or model_cfg.hidden_size // model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        rope_theta=model_cfg.rope_theta,
        rms_norm_eps=model_cfg.rms_norm_eps,
        tie_word_embeddings=model_cfg.tie_word_embeddings,
        initializer_range=model_cfg.init_std,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    if arch is ModelArch.qwen3_moe:
        config = Qwen3MoeConfig(
            intermediate_size=model_cfg.intermediate_size,
            moe_intermediate_size=model_cfg.moe_intermediate_size,
            num_experts=model_cfg.num_experts,
            num_experts_per_tok=model_cfg.num_experts_per_tok,
            **common,
        )
        model_cls = Qwen3MoeForCausalLM
    else:
        config = Qwen3Config(intermediate_size=model_cfg.intermediate_size, **common)
        model_cls = Qwen3ForCausalLM
    config._attn_implementation = model_cfg.attn_implementation
    with torch.device("meta") if empty else nullcontext():
        lm = model_cls(config)
    moe.install(lm, model_cfg.moe_balancing or MoeBalancing.bias, model_cfg.moe_bias_rate)
    return lm


def set_balancing(lm: nn.Module, model_cfg: Any) -> None:
    """model.moe_balancing on a loaded MoE model; null keeps the balancing its checkpoint was trained with."""
    if model_cfg.moe_balancing is not None:
        moe.install(lm, model_cfg.moe_balancing, model_cfg.moe_bias_rate)


def rope_theta_of(config: Any) -> Optional[float]:
    """The RoPE base of an HF config: transformers 5 keeps it in rope_parameters, 4.x as rope_theta."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return None if theta is None else float(theta)


def set_positions(config: Any, rope_theta: Optional[float], max_position_embeddings: Optional[int]) -> None:
    """A new RoPE base and position limit (mid-training); RoPE has no learned positions, so the weights load as they are."""
    if rope_theta is not None:
        params = getattr(config, "rope_parameters", None)
        if isinstance(params, dict):
            config.rope_parameters = {**params, "rope_theta": float(rope_theta)}
        if hasattr(config, "rope_theta") or not isinstance(params, dict):
            config.rope_theta = float(rope_theta)
    if max_position_embeddings is not None:
        config.max_position_embeddings = int(max_position_embeddings)


def load_pretrained(name_or_path: str, key: str = "model", attn_implementation: str = "sdpa", dtype: Any = None,
                    rope_theta: Optional[float] = None, max_position_embeddings: Optional[int] = None,
                    empty: bool = False) -> nn.Module:
    """Load an HF causal LM, with its MoE balancing as saved and, if given, a new RoPE base and position limit;
    a missing or unreadable directory is a one-line DataError. `empty`: the model's shape only, on the meta
    device, without reading its weights (FSDP's processes other than the first: sharding.shard fills them)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(name_or_path)
    looks_local = path.is_absolute() or name_or_path.startswith(".") or path.exists() or len(path.parts) > 2
    if looks_local and not (path / "config.json").exists():
        raise DataError(f"{key}={name_or_path}: no Hugging Face model there (config.json is missing)")
    from safetensors import SafetensorError

    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would come before our one line, and say less
    try:
        moe.register_checkpoint_classes()
        config = AutoConfig.from_pretrained(name_or_path)
        set_positions(config, rope_theta, max_position_embeddings)
        # use_safetensors: weights never come through pickle, whatever else lies in the directory.
        # A bias-balanced MoE's class is ntp-rl's own (it is in config.json's auto_map): no remote code runs.
        model_cls = moe.model_class(config) or AutoModelForCausalLM
        if empty:
            with torch.device("meta"):
                lm = (model_cls.from_config if model_cls is AutoModelForCausalLM else model_cls._from_config)(
                    config, attn_implementation=attn_implementation, dtype=dtype or torch.float32)
        else:
            lm = model_cls.from_pretrained(name_or_path, config=config, attn_implementation=attn_implementation,
                                           dtype=dtype or torch.float32, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        if "ignore_mismatched_sizes" in str(exc):
            raise DataError(f"{key}={name_or_path}: cannot load the model: its weights do not have the shapes its "
                            "config.json describes (was config.json edited, or taken from another model?)") from exc
        raise DataError(f"{key}={name_or_path}: cannot load the model ({first_line(exc)})") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    moe.reinstall_from(lm)
    return lm


# model config key -> the HF config attribute it sets
_ARCH_FIELDS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}


def check_same_architecture(lm: nn.Module, model_cfg: Any, source: str) -> None:
    """A resumed run must be the model its config describes, or the optimizer state is meaningless."""
    arch = model_cfg.arch
    if arch is ModelArch.hf:
        return
    expected_type = "qwen3_moe" if arch is ModelArch.qwen3_moe else "qwen3"
    same_type = moe.is_qwen3_moe(lm.config) if arch is ModelArch.qwen3_moe else lm.config.model_type == expected_type
    diffs = [] if same_type else [f"model_type {lm.config.model_type} != {expected_type}"]
    for key, attr in _ARCH_FIELDS.items():
        have = getattr(lm.config, attr, None)
        if have != model_cfg[key]:
            diffs.append(f"model.{key}={model_cfg[key]} but the checkpoint has {have}")
    if diffs:
        raise ConfigError("model", f"does not match the checkpoint {source}: {'; '.join(diffs)}")


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Keep only each decoder layer's input and recompute the layer in backward. transformers 5.2x renamed
    `gradient_checkpointing_enable` (deprecated, gone in v6) to `activation_checkpointing_enable`. It checkpoints
    only in training mode, and a loaded model is in eval mode."""
    enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
    enable()
    lm.train()


def count_parameters(model: nn.Module, exclude_embeddings: bool = False, active: bool = False) -> int:
    """Parameters of the model; `active`: those one token computes with, each routed expert counted at
    top-k / experts (what MoE names like 10B-A0.5B give, and what a token's FLOPs are proportional to)."""
    total = sum(_active_share(model, name) * p.numel() for name, p in model.named_parameters()) if active else \
        sum(p.numel() for p in model.parameters())
    total = round(total)
    if exclude_embeddings:
        embeddings = model.get_input_embeddings().weight
        total -= embeddings.numel()
        head = model.get_output_embeddings()
        if head is not None and head.weight is not embeddings:
            total -= head.weight.numel()
    return total


def _active_share(model: nn.Module, name: str) -> float:
    """The share of a parameter a token uses: top-k / experts for routed experts (per-expert names,
    `mlp.experts.3.up_proj.weight`, or transformers 5's fused `mlp.experts.gate_up_proj`), else 1.
    A shared expert (`shared_expert`) is used by every token."""
    config = getattr(model, "config", None)
    experts = getattr(config, "num_experts", None) or getattr(config, "n_routed_experts", None)
    if not experts or ".experts." not in f".{name}":
        return 1.0
    return config.num_experts_per_tok / experts


class ShapedLossLM(nn.Module):
    """A causal LM whose forward returns the reward-shaped loss for next-token prediction.

    Wrapping the LM (instead of calling its parts from the training loop) keeps DDP's and
    FSDP's hooks around the LM head, which the fused loss reads directly.
    """

    def __init__(self, lm: nn.Module, loss_cfg: Any):
        super().__init__()
        self.lm = lm
        self.shaping = RewardShaping.from_config(loss_cfg)
        self.impl = loss_cfg.impl
        self.chunk_size = int(loss_cfg.chunk_size)
        self.compile = bool(loss_cfg.compile)
        if self.impl is LossImpl.fused and not has_plain_linear_head(lm):
            self.impl = LossImpl.chunked

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LossOutput:
        config = self.lm.config
        moe = bool(getattr(config, "output_router_logits", False))
        extra = {"output_router_logits": True} if moe else {}
        if self.impl is LossImpl.fused:
            out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
            head = self.lm.get_output_embeddings()
            result = shaped_ntp_loss_fused(out.last_hidden_state, head.weight, labels, self.shaping,
                                           chunk_size=self.chunk_size, compile=self.compile)
        else:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
            fn = shaped_ntp_loss if self.impl is LossImpl.chunked else shaped_ntp_loss_reference
            kwargs = {"chunk_size": self.chunk_size, "compile": self.compile} if self.impl is LossImpl.chunked else {}
            result = fn(out.logits, labels, self.shaping, **kwargs)
        if not moe:
            return result
        # The router's load-balancing loss keeps experts in use; it is added as HF adds it.
        balance = sys.modules[type(self.lm).__module__].load_balancing_loss_func(
            out.router_logits, config.num_experts, config.num_experts_per_tok, attention_mask)
        stats = dict(result.stats, router_aux_loss=balance.detach().float())
        return LossOutput(result.loss + config.router_aux_loss_coef * balance.to(result.loss.dtype), stats)


def check_vocab(model: nn.Module, tokenizer: Any) -> None:
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError("model.vocab_size", f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab}", vocab)
