"""Model presets and the training module: the paper's shapes, and the loss matching HF's own."""

import pytest
import torch
from omegaconf import OmegaConf

from ntp_rl.config.compose import compose
from ntp_rl.models import ShapedLossLM, build_model, count_parameters

SMALL_MOE = ["model=moe_5b_a0p3b", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=4",
             "model.num_kv_heads=2", "model.head_dim=8", "model.num_experts=4", "model.num_experts_per_tok=2",
             "model.moe_intermediate_size=16", "model.moe_balancing=aux_loss"]


@pytest.mark.parametrize("preset, layers, hidden, ffn, heads, kv", [
    ("dense_1b", 28, 1536, 4608, 16, 4),
    ("dense_4b", 36, 2560, 9728, 32, 8),
])
def test_dense_presets_have_the_papers_shapes(preset, layers, hidden, ffn, heads, kv):
    cfg = compose("pretrain", [f"model={preset}"]).model
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (
        layers, hidden, ffn, heads, kv)


@pytest.mark.parametrize("preset, layers, hidden", [("moe_5b_a0p3b", 12, 1024), ("moe_10b_a0p5b", 16, 1536),
                                                    ("moe_20b_a1b", 24, 2048)])
def test_moe_presets_have_the_papers_shape_and_the_size_their_name_says(preset, layers, hidden):
    cfg = compose("pretrain", [f"model={preset}"]).model
    # PAPER.md section 6: the 10B keeps the 5B's experts; the 20B's shape is derived (its yaml says how)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (
        layers, hidden, 384, 12, 320)
    with torch.device("meta"):  # the real size, without allocating billions of parameters
        lm = build_model(cfg, vocab_size=151936, pad_token_id=0, eos_token_id=1)
    # "10b_a0p5b": 10B in all, 0.5B active per token without the embeddings, each to one significant figure
    total_name, active_name = preset.split("_")[1:]
    total_b, active_b = (float(size.strip("ab").replace("p", ".")) for size in (total_name, active_name))
    assert float(f"{count_parameters(lm) / 1e9:.1g}") == total_b, count_parameters(lm)
    active = count_parameters(lm, exclude_embeddings=True, active=True)
    assert float(f"{active / 1e9:.1g}") == active_b, active


def test_active_parameters_count_each_routed_expert_at_top_k_over_experts():
    cfg = compose("pretrain", SMALL_MOE).model  # 4 experts, 2 active
    lm = build_model(cfg, vocab_size=100, pad_token_id=0, eos_token_id=1)
    experts = sum(p.numel() for name, p in lm.named_parameters() if ".experts." in name)
    assert experts > 0
    assert count_parameters(lm, active=True) == count_parameters(lm) - experts // 2
    dense = build_model(compose("pretrain", []).model, vocab_size=100, pad_token_id=0, eos_token_id=1)
    assert count_parameters(dense, active=True) == count_parameters(dense)


@pytest.mark.parametrize("overrides", [[], SMALL_MOE, [*SMALL_MOE[:-1], "model.moe_balancing=bias"]],
                         ids=["dense", "moe_aux_loss", "moe_bias"])
def test_every_loss_path_gives_hf_cross_entropy(overrides):
    cfg = compose("pretrain", ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
                               "model.num_kv_heads=1", *overrides])
    aux_loss = "model.moe_balancing=aux_loss" in overrides  # the bias adds no loss term
    torch.manual_seed(0)
    lm = build_model(cfg.model, vocab_size=100, pad_token_id=0, eos_token_id=1)
    ids = torch.randint(0, 100, (2, 9))
    hf = lm(ids, labels=ids)  # HF shifts internally and adds the router loss for MoE with aux_loss
    coef = lm.config.router_aux_loss_coef if aux_loss else 0.0
    hf_ce = hf.loss.item() - coef * (hf.aux_loss.item() if aux_loss else 0.0)
    for impl in ("fused", "chunked", "reference"):
        out = ShapedLossLM(lm, OmegaConf.merge(cfg.loss, {"impl": impl}))(ids[:, :-1], ids[:, 1:])
        assert ("router_aux_loss" in out.stats) == aux_loss
        aux = out.stats["router_aux_loss"].item() if aux_loss else 0.0
        assert out.loss.item() - coef * aux == pytest.approx(hf_ce, abs=1e-5), impl
        if aux_loss:  # the router sees the inputs, which exclude the last token
            assert aux == pytest.approx(lm(ids[:, :-1]).aux_loss.item(), abs=1e-6)


def test_mfu_counts_the_flops_a_token_makes_in_an_moe_not_every_experts():
    from types import SimpleNamespace

    from ntp_rl.runtime import flops_per_token
    from ntp_rl.stages.pretrain import Throughput

    cfg = compose("pretrain", SMALL_MOE)
    lm = build_model(cfg.model, vocab_size=100, pad_token_id=0, eos_token_id=1)
    speed = Throughput(cfg, SimpleNamespace(device=torch.device("cpu"), world=1), lm)
    active = count_parameters(lm, exclude_embeddings=True, active=True)
    assert active < count_parameters(lm, exclude_embeddings=True)
    assert speed.flops_per_token == flops_per_token(active, 2, 4, 8, cfg.data.seq_len)
