"""vLLM with a bias-balanced MoE policy (`tiny_moe`, trained here with large router biases, fp32, CPU):
the engine routes as the trainer does, takes the trainer's fused expert weights and biases, refuses a
weight it cannot place, and stays the policy through RL steps. One engine for the module."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ntp_rl import moe
from ntp_rl.config.compose import compose
from ntp_rl.errors import UserError
from ntp_rl.generation import HFGenerator, Sampling
from ntp_rl.models import load_pretrained
from ntp_rl.stages import run_stage
from ntp_rl.tasks import build_task
from test_vllm import CONFIG, RL_ARGS, TASK, fields, one_thread, prompts, reference_logprobs  # noqa: F401 (a fixture)

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_cache) -> Path:
    """tiny_moe pre-trained with a fast bias rate: biases of ~0.5, which change many tokens' experts."""
    out = tmp_path_factory.mktemp("vllm_moe_policy")
    overrides = [*TINY, "model=tiny_moe", "model.hidden_size=64", "model.moe_bias_rate=0.05", f"out_dir={out}", f"data.cache_dir={shared_cache}",
                 f"run_dir={out / 'run'}", "data.difficulty=1", "data.seq_len=64", "train.batch_size=16",
                 "train.micro_batch_size=16", "train.max_steps=40", "train.eval_every=40", "train.save_every=40",
                 "optim.lr=1e-2", "optim.warmup_steps=5"]
    run_stage("pretrain", compose("pretrain", overrides), overrides=overrides)
    (path,) = (out / "run" / "checkpoints").iterdir()
    # Released Qwen3-MoE checkpoints renormalise the chosen experts' weights: the trainer and the engine read it here.
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "norm_topk_prob": True}))
    return path


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    return load_pretrained(str(checkpoint)).eval()


@pytest.fixture(scope="module")
def task():
    return build_task(compose("rl", TASK).task)


@pytest.fixture(scope="module")
def engine(checkpoint, tokenizer, task):
    from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator, shutdown_engine

    yield VLLMGenerator(checkpoint, tokenizer, task.stop_strings, VLLMConfig(**CONFIG))
    shutdown_engine()


def engine_logprobs(engine, batch, responses):
    return torch.tensor([x for row in engine.score(batch, responses) for x in row])


def trainer_logprobs(model, tokenizer, batch, responses):
    return torch.cat([reference_logprobs(model, tokenizer, p, r) for p, r in zip(batch, responses)])


def test_the_engine_routes_with_the_bias_as_the_trainer_does(engine, model, tokenizer, task):
    biases = [r.expert_bias for r in moe.routers(model)]
    assert max(b.abs().max().item() for b in biases) > 0.3, "the biases must be large enough to change routing"
    assert all(r.norm_topk_prob for r in moe.routers(model))
    batch = prompts(task, 24)
    greedy = Sampling(temperature=0.0, max_new_tokens=32)
    hf = HFGenerator(model, tokenizer, task.stop_strings, batch_size=64)
    assert fields(engine.generate(batch, 1, greedy, 0)) == fields(hf.generate(batch, 1, greedy, 0))

    sampled = engine.generate(batch[:8], 4, Sampling(temperature=1.0, max_new_tokens=32), seed=3)
    rows = [(p, c) for p, cs in zip(batch, sampled) for c in cs]
    ours = torch.tensor([x for _, c in rows for x in c.logprobs])
    theirs = torch.cat([reference_logprobs(model, tokenizer, p, c.token_ids) for p, c in rows])
    assert len(ours) > 100 and (ours - theirs).abs().max() < 1e-4

    # The check can fail: the same model routing without its biases is measurably another model.
    saved = [b.clone() for b in biases]
    try:
        for b in biases:
            b.zero_()
        unbiased = torch.cat([reference_logprobs(model, tokenizer, p, c.token_ids) for p, c in rows])
    finally:
        for b, s in zip(biases, saved):
            b.copy_(s)
    assert (ours - unbiased).abs().max() > 1e-2


def test_the_trainers_fused_experts_and_biases_reach_the_engine(engine, model, tokenizer, task):
    import copy

    from ntp_rl.stages.rl_sample import lm_weights  # what the rl stage sends the engine, from one process

    batch = prompts(task, 6)
    responses = [cs[0].token_ids for cs in engine.generate(batch, 1, Sampling(temperature=1.0, max_new_tokens=24), 5)]
    before = engine_logprobs(engine, batch, responses)
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        for router in moe.routers(perturbed):
            router.expert_bias.add_(torch.randn(router.expert_bias.shape, generator=generator))
    names = [name for name, _ in lm_weights(perturbed)]
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in names) and any(n.endswith("expert_bias") for n in names)
    try:
        engine.load_weights(lm_weights(perturbed))
        after = engine_logprobs(engine, batch, responses)
        assert (after - trainer_logprobs(perturbed, tokenizer, batch, responses)).abs().max() < 1e-4
        assert (after - before).abs().max() > 0.05
        again = engine.generate(batch, 1, Sampling(temperature=0.0, max_new_tokens=24), 5)
        hf = HFGenerator(perturbed, tokenizer, task.stop_strings).generate(batch, 1, Sampling(0.0, 1.0, 24), 5)
        assert fields(again) == fields(hf)
    finally:
        engine.load_weights(lm_weights(model))
    assert (engine_logprobs(engine, batch, responses) - before).abs().max() < 1e-5


def test_rl_with_vllm_samples_from_the_moe_policy_at_every_step(engine, checkpoint, model, tokenizer, task, tmp_path):
    from ntp_rl.tracking import read_metrics

    batch = prompts(task, 6)
    responses = [cs[0].token_ids for cs in engine.generate(batch, 1, Sampling(temperature=1.0, max_new_tokens=24), 11)]
    args = [f"init_from={checkpoint}", f"out_dir={tmp_path}", *RL_ARGS]
    result = run_stage("rl", compose("rl", args), overrides=args)
    trained = load_pretrained(result["checkpoint"]).eval()
    now = engine_logprobs(engine, batch, responses)  # the run's engine is this module's: it holds the last update
    assert (now - trainer_logprobs(trained, tokenizer, batch, responses)).abs().max() < 1e-4
    assert (now - trainer_logprobs(model, tokenizer, batch, responses)).abs().max() > 1e-3, "the policy must move"
    greedy = Sampling(temperature=0.0, max_new_tokens=24)
    hf = HFGenerator(trained, tokenizer, task.stop_strings).generate(batch, 1, greedy, 0)
    assert fields(engine.generate(batch, 1, greedy, 0)) == fields(hf)
    steps = [row for row in read_metrics(Path(result["checkpoint"]).parents[1]) if "reward" in row]
    # A step whose groups all had equal rewards trains on nothing and measures nothing.
    gaps = [row["sampling/sampling_logp_difference/max"] for row in steps if "sampling/sampling_logp_difference/max" in row]
    assert len(steps) == 3 and len(gaps) >= 2 and max(gaps) < 1e-4


def test_a_log_prob_gap_beyond_the_limit_stops_rl_in_one_line(engine, checkpoint, tmp_path):
    """fp32 engine and trainer differ by ~1e-6 here; a limit below that stands in for an engine that is
    not sampling from the policy (the default limits: 1e-3 in fp32, 0.1 in bf16). The gap of one step can
    come out exactly 0 (it did once at step 1, under load), so the run must stop at some step, not at the first."""
    args = [f"init_from={checkpoint}", f"run_dir={tmp_path / 'run'}", *RL_ARGS, "rl.max_logp_gap=1e-12"]
    with pytest.raises(UserError, match=r"rl step \d+: the vLLM engine's log-probs .* beyond the 1e-12 that a float32 "
                                        r"engine explains: it is not sampling from the policy") as info:
        run_stage("rl", compose("rl", args), overrides=args)
    assert "\n" not in str(info.value)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["status"] == "failed"


def test_a_weight_the_engine_cannot_place_fails_in_one_line(engine, model):
    # vLLM's own Qwen3-MoE loader skips unknown names ending in "_bias": this one must not be skipped.
    # Last in the module: a sync that failed half-way leaves the engine unusable (the run stops there).
    for name in ("model.layers.0.mlp.gate.router_bias", "model.layers.0.mlp.no_such.weight"):
        with pytest.raises(UserError, match="does not take the policy's weights") as info:
            engine.load_weights([(name, torch.zeros(8))])
        message = str(info.value)
        assert "\n" not in message and len(message) < 200 and name.removeprefix("model.").rsplit(".", 1)[0] in message
    # Parameters without the saved buffers: the routers' biases would be left undefined.
    with pytest.raises(UserError, match=r"lack the router bias model\.layers\.0\.mlp\.gate\.expert_bias \(and 1 more\)"):
        engine.load_weights(model.named_parameters())


def test_vllm_outside_ntp_rl_finds_the_model_through_the_plugin():
    """`vllm serve <checkpoint>` loads pyproject's vllm.general_plugins: the bias checkpoint's architecture is known."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from ntp_rl.modeling_biased_moe import ARCHITECTURE

    load_general_plugins()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()


@pytest.mark.slow
def test_pipeline_with_an_moe_policy_and_vllm_runs_end_to_end(tmp_path, shared_cache):
    """`ntp-rl pipeline model=tiny_moe generator=vllm` as a user runs it, with the engine's defaults (its dtype
    the trainer's, torch.compile on): vLLM's output goes to each run's vllm.log, one console line per engine.
    (Six pre-training steps leave every RL group with equal rewards: the gap is checked in the tests above.)"""
    from conftest import run_cli
    from test_pipeline import PIPE

    result = run_cli("pipeline", *PIPE, "model=tiny_moe", "model.hidden_size=64", "model.moe_bias_rate=0.05",
                     "generator=vllm", f"out_dir={tmp_path}", f"data.cache_dir={shared_cache}", timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    (lineage,) = (tmp_path / "pipeline").iterdir()
    for stage in ("eval_base", "rl", "eval_rl"):
        run = json.loads((lineage / stage / "run.json").read_text())
        assert run["status"] == "finished" and run["generator"] == {"name": "vllm", "dtype": "float32", "sleep_mode": False}
    # eval_base starts the engine, rl reuses it (the same checkpoint and settings), eval_rl starts another
    assert all((lineage / stage / "vllm.log").stat().st_size > 0 for stage in ("eval_base", "rl", "eval_rl"))
    console = result.stdout + result.stderr
    assert console.count("vLLM engine: float32, started in") == 2, console[-3000:]
    assert "Downcasting" not in console and "WARNING" not in console and "INFO" not in console, console[-3000:]
