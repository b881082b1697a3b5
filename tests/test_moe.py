"""MoE expert balancing: the paper's router bias (no gradient, moved by load, saved and reloaded) and HF's loss."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ntp_rl import moe
from ntp_rl.config.compose import compose
from ntp_rl.models import ShapedLossLM, build_model, load_pretrained
from ntp_rl.optim import build_adamw
from ntp_rl.stages import run_stage
from ntp_rl.tracking import read_metrics

TINY_MOE = ["model=tiny_moe", "model.hidden_size=32", "model.num_heads=2", "model.num_kv_heads=1",
            "model.num_experts=4", "model.moe_intermediate_size=16"]


def tiny_moe(*overrides, seed=0):
    cfg = compose("pretrain", [*TINY_MOE, *overrides])
    torch.manual_seed(seed)
    return build_model(cfg.model, vocab_size=100, pad_token_id=0, eos_token_id=1), cfg


def skewed(lm, ids):
    """Router logits tilted towards experts 0 and 1 along the tokens' mean direction: an unbalanced router."""
    inputs = []
    hooks = [r.register_forward_hook(lambda module, args, out: inputs.append(args[0])) for r in moe.routers(lm)]
    with torch.no_grad():  # no load is counted
        lm(ids)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for router, x in zip(moe.routers(lm), inputs):
            mean = x.reshape(-1, x.shape[-1]).mean(0)
            router.weight[0] += 4 * mean / mean.norm() ** 2
            router.weight[1] += 2 * mean / mean.norm() ** 2
    return lm


def imbalance_over_steps(lm, ids, steps):
    history = []
    for _ in range(steps):
        lm(ids)  # a forward with gradients is one the load is counted on
        history.append(moe.after_step(lm, lambda t: t, stepped=True)["moe/load_imbalance"])
    return history


def test_the_bias_evens_the_load_and_without_it_the_load_stays_uneven():
    ids = torch.randint(0, 100, (8, 32), generator=torch.Generator().manual_seed(0))
    biased = imbalance_over_steps(skewed(tiny_moe("model.moe_bias_rate=0.1")[0], ids), ids, 40)
    fixed = imbalance_over_steps(skewed(tiny_moe("model.moe_balancing=none")[0], ids), ids, 40)
    assert biased[0] == pytest.approx(fixed[0]) and biased[0] > 1.4, "the same skewed start"
    assert max(fixed) == pytest.approx(min(fixed)), "no balancing: the routing never changes"
    assert sum(biased[-10:]) / 10 < 1.15, biased


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_the_bias_chooses_experts_but_not_their_weights(norm_topk_prob):
    lm, _ = tiny_moe()
    router = moe.routers(lm)[0]
    router.norm_topk_prob = norm_topk_prob
    hidden = torch.randn(10, router.hidden_dim)
    router.expert_bias[0] = 100.0  # expert 0 wins every token's choice...
    logits, weights, chosen = router(hidden)
    assert (chosen == 0).any(dim=-1).all()
    probs = torch.softmax(logits.float(), dim=-1).gather(-1, chosen)  # ...but is weighted by its own probability
    expected = probs / probs.sum(-1, keepdim=True) if norm_topk_prob else probs
    torch.testing.assert_close(weights, expected.to(weights.dtype))
    assert torch.allclose(weights.sum(-1), torch.ones(10)) == norm_topk_prob

    # Without a bias the rule is transformers' own Qwen3-MoE router, renormalised or not.
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    router.expert_bias.zero_()
    plain = Qwen3MoeTopKRouter(lm.config)
    plain.norm_topk_prob = norm_topk_prob
    plain.weight.data.copy_(router.weight)
    _, plain_weights, plain_chosen = plain(hidden)
    _, weights, chosen = router(hidden)
    torch.testing.assert_close(chosen.sort(-1).values, plain_chosen.sort(-1).values)
    torch.testing.assert_close(weights.gather(-1, chosen.argsort(-1)), plain_weights.gather(-1, plain_chosen.argsort(-1)))


def test_the_load_counts_real_tokens_not_padding():
    from ntp_rl.rl.rollout import PolicyLogprobs

    lm, _ = tiny_moe()
    ids = torch.randint(2, 100, (3, 12))
    attention = torch.ones(3, 12, dtype=torch.long)
    attention[0, :5] = 0  # left padding, as rollouts have it
    attention[1, 9:] = 0
    response = torch.zeros(3, 11, dtype=torch.bool)
    response[:, 6:8] = True
    PolicyLogprobs(lm, chunk_size=64)(ids, attention, response, 1.0)
    for router in moe.routers(lm):
        assert router.expert_load.sum().item() == attention.sum().item() * router.top_k


def test_the_bias_gets_no_gradient_and_moves_only_by_the_update_rule():
    lm, cfg = tiny_moe("model.moe_bias_rate=0.01")
    model = ShapedLossLM(lm, cfg.loss).train()
    biases = [router.expert_bias for router in moe.routers(lm)]
    assert all(not b.requires_grad for b in biases)
    assert not {id(b) for b in biases} & {id(p) for p in model.parameters()}
    optimizer = build_adamw(model, cfg.optim, fused=False)
    ids = torch.randint(0, 100, (4, 17))
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    assert all(b.grad is None for b in biases)
    before = [b.clone() for b in biases]
    optimizer.step()
    assert all(torch.equal(b, a) for b, a in zip(biases, before)), "the optimizer must not touch the bias"
    loads = [router.expert_load.clone() for router in moe.routers(lm)]
    moe.after_step(lm, lambda t: t, stepped=True)
    for bias, old, load in zip(biases, before, loads):
        torch.testing.assert_close(bias - old, 0.01 * torch.sign(load.mean() - load))
    assert all(router.expert_load is None for router in moe.routers(lm)), "counts start again each step"


def test_a_skipped_step_leaves_the_bias_and_aux_loss_mode_has_none():
    lm, _ = tiny_moe()
    with torch.no_grad():  # validation and sampling: nothing counted, nothing to measure
        lm(torch.randint(0, 100, (2, 8)))
    assert moe.after_step(lm, lambda t: t, stepped=True) == {}
    lm(torch.randint(0, 100, (2, 8)))
    before = [r.expert_bias.clone() for r in moe.routers(lm)]
    metrics = moe.after_step(lm, lambda t: t, stepped=False)
    assert metrics["moe/load_imbalance"] >= 1.0
    assert all(torch.equal(r.expert_bias, b) for r, b in zip(moe.routers(lm), before))
    aux, _ = tiny_moe("model.moe_balancing=aux_loss")
    assert aux.config.output_router_logits and not any(name.endswith("expert_bias") for name, _ in aux.named_buffers())


@pytest.fixture
def moe_run(tiny):
    def run(*overrides):
        args = [*tiny, *TINY_MOE, "train.max_steps=6", "train.log_every=1", *overrides]
        results = run_stage("pretrain", compose("pretrain", args), overrides=list(overrides))
        return results, Path(results["checkpoint"])
    return run


def test_pretrain_with_bias_logs_load_and_its_checkpoint_reloads_the_bias(moe_run):
    results, ckpt = moe_run("model.moe_bias_rate=0.1")
    run_dir = ckpt.parents[1]
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert len(rows) == 6 and all(r["moe/load_imbalance"] >= 1.0 for r in rows)
    assert 0 < rows[-1]["moe/bias_abs_max"] <= 6 * 0.1 + 1e-6, "+-rate per step"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["moe_balancing"] == "bias" and config["architectures"] == ["NtpRlQwen3MoeForCausalLM"]
    assert config["model_type"] == "ntp_rl_qwen3_moe" and config["auto_map"]["AutoConfig"].endswith(".NtpRlQwen3MoeConfig")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as saved:
        stored = {k: saved.get_tensor(k) for k in saved.keys() if k.endswith("expert_bias")}
    assert len(stored) == 2 and all(t.abs().max() > 0 for t in stored.values())
    reloaded = load_pretrained(str(ckpt))
    for name, buffer in reloaded.named_buffers():
        if name.endswith("expert_bias"):
            torch.testing.assert_close(buffer, stored.pop(name))
    assert not stored, "every saved bias is re-installed"


def test_a_bias_checkpoint_routes_with_its_bias_from_every_loader(moe_run, tmp_path):
    """ntp-rl's loader, transformers with the checkpoint's own code, and a hub id all give ntp-rl's logits;
    plain transformers (no remote code) refuses the checkpoint, naming trust_remote_code, rather than route
    without the bias."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    _, ckpt = moe_run("model.moe_bias_rate=0.1")
    ids = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_pretrained(str(ckpt)).eval()(ids).logits
        remote = AutoModelForCausalLM.from_pretrained(str(ckpt), trust_remote_code=True).eval()
        torch.testing.assert_close(remote(ids).logits, expected, rtol=0, atol=1e-6)

    # A user with transformers alone (ntp-rl's import registers the checkpoint's classes, so a fresh process).
    plain = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForCausalLM; "
                            "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(ckpt)],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert plain.returncode != 0 and "trust_remote_code=True" in plain.stderr, plain.stderr[-2000:]

    # Saved before the checkpoint had a model type of its own: still routed with its biases by ntp-rl.
    legacy = tmp_path / "legacy"
    shutil.copytree(ckpt, legacy)
    config = json.loads((legacy / "config.json").read_text())
    config["model_type"] = "qwen3_moe"
    del config["auto_map"]["AutoConfig"]
    (legacy / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(str(legacy)).eval()(ids).logits, expected, rtol=0, atol=1e-6)

    # A hub id, offline, from the hub cache's layout: a bias on the hub arrives as one in a directory.
    snapshot = tmp_path / "hub" / "models--someone--tiny-moe" / "snapshots" / ("0123abc" * 6)[:40]
    snapshot.mkdir(parents=True)
    for file in ckpt.iterdir():
        if file.suffix in (".json", ".safetensors", ".py"):
            shutil.copy(file, snapshot / file.name)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch\n"
              "from transformers import AutoModelForCausalLM\n"
              "from ntp_rl.models import load_pretrained\n"
              "ids = torch.load(sys.argv[1])\n"
              "with torch.no_grad():\n"
              "    ours = load_pretrained('someone/tiny-moe').eval()(ids).logits\n"
              "    theirs = AutoModelForCausalLM.from_pretrained('someone/tiny-moe', trust_remote_code=True).eval()(ids).logits\n"
              "torch.save({'ntp_rl': ours, 'remote_code': theirs}, sys.argv[2])\n")
    import os

    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
                                 "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert result.returncode == 0, result.stderr[-2000:]
    for name, logits in torch.load(tmp_path / "logits.pt").items():
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6, msg=name)


def test_pretrain_with_the_aux_loss_logs_load_and_saves_no_bias(moe_run):
    _, ckpt = moe_run("model.moe_balancing=aux_loss")
    rows = [r for r in read_metrics(ckpt.parents[1]) if "train/loss" in r]
    assert all(r["moe/load_imbalance"] >= 1.0 for r in rows) and "moe/bias_abs_max" not in rows[-1]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["moe_balancing"] == "aux_loss" and config["output_router_logits"] is True
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as saved:
        assert not [k for k in saved.keys() if "expert_bias" in k]
    reloaded = load_pretrained(str(ckpt))
    assert reloaded.config.output_router_logits and not [n for n, _ in reloaded.named_buffers() if "expert_bias" in n]


def test_rl_keeps_the_pretrained_biases_and_logs_the_load(moe_run, tmp_path):
    from rl_helpers import RL_TINY

    _, ckpt = moe_run("model.moe_bias_rate=0.01")
    args = [*RL_TINY, "rl.max_steps=2", "rl.eval_every=2", "init_from=x", f"out_dir={tmp_path / 'rl'}"]
    cfg = compose("rl", args)
    cfg.init_from = str(ckpt)  # its run's name holds "=", which an override cannot
    results = run_stage("rl", cfg, overrides=args)
    rows = [r for r in read_metrics(Path(results["checkpoint"]).parents[1]) if "policy_loss" in r]
    assert rows and all(r["moe/load_imbalance"] >= 1.0 for r in rows)
    before, after = load_pretrained(str(ckpt)), load_pretrained(results["checkpoint"])
    for (name, a), (_, b) in zip(before.named_buffers(), after.named_buffers()):
        if name.endswith("expert_bias"):
            assert a.abs().max() > 0 and torch.equal(a, b), name


@pytest.mark.slow
def test_a_resumed_moe_run_continues_its_biases_exactly(tiny, tmp_path):
    from conftest import run_cli

    common = [*tiny, *TINY_MOE, "model.moe_bias_rate=0.01", "train.max_steps=6", "train.save_every=3",
              "train.log_every=1"]
    straight = run_stage("pretrain", compose("pretrain", [*common, f"run_dir={tmp_path / 'straight'}"]))
    args = ["pretrain", *common, f"run_dir={tmp_path / 'killed'}"]
    assert run_cli(*args, env={"NTP_RL_KILL_AT": "step:5"}).returncode == -9
    resumed = run_cli(*args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = [r for r in read_metrics(tmp_path / "straight") if "train/loss" in r]
    b = [r for r in read_metrics(tmp_path / "killed") if "train/loss" in r]
    assert [(r["train/loss"], r["moe/load_imbalance"]) for r in a] == [(r["train/loss"], r["moe/load_imbalance"]) for r in b]
    with safe_open(str(Path(straight["checkpoint"]) / "model.safetensors"), framework="pt") as x, \
            safe_open(str(tmp_path / "killed" / "checkpoints" / "step_00000006" / "model.safetensors"), framework="pt") as y:
        for key in [k for k in x.keys() if k.endswith("expert_bias")]:
            assert torch.equal(x.get_tensor(key), y.get_tensor(key)), key
