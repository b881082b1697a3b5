"""`ntp-rl rl`: GRPO arithmetic on hand-computed cases, dynamic sampling, and whole runs from a small policy."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_cli
from ntp_rl.checkpoint import latest_checkpoint, list_checkpoints
from ntp_rl.cli import check_command_line
from ntp_rl.config.compose import compose
from ntp_rl.errors import UserError
from ntp_rl.config.schema import GRPOConfig, LossAggregation
from ntp_rl.rl.advantages import ADVANTAGES, AdvantageInputs, compute_advantages
from ntp_rl.rl.policy_loss import PolicyLossInputs, aggregate, aggregation_count, k3_kl, ppo_clip
from ntp_rl.rl.rollout import (Group, PolicyLogprobs, PromptStream, build_batch, collect_groups, deal_groups,
                               token_logprobs)
from ntp_rl.seeding import rollout_seed
from ntp_rl.stages import run_stage
from ntp_rl.tasks import TaskProblem
from ntp_rl.tracking import read_metrics

# ---------------------------------------------------------------------------
# Advantages


def test_grpo_advantages_on_hand_computed_groups():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    scaled = compute_advantages(AdvantageInputs(rewards), GRPOConfig(advantage="grpo", advantage_eps=0.0))
    # group 1: mean 1/2, unbiased std sqrt(1/3); group 2: mean 1/4, std 1/2
    s = 0.5 / math.sqrt(1 / 3)
    assert scaled[0].tolist() == pytest.approx([s, -s, -s, s])
    assert scaled[1].tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    assert scaled[2:].abs().sum() == 0 and not scaled.isnan().any(), "equal rewards carry no signal"

    centred = compute_advantages(AdvantageInputs(rewards), GRPOConfig(advantage="grpo", scale_rewards=False))
    assert centred[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert centred[1].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert centred[2:].abs().sum() == 0


def test_rloo_baseline_leaves_each_sample_out():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    got = compute_advantages(AdvantageInputs(rewards), GRPOConfig(advantage="rloo"))
    # sample i's baseline is the mean of the other three rewards of its group
    assert got[0].tolist() == pytest.approx([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3])
    assert got[1].tolist() == pytest.approx([3 - 5 / 3, 1 - 7 / 3, 2 - 2, 2 - 2])
    assert got[2].abs().sum() == 0, "equal rewards carry no signal"
    # unlike GRPO it is not rescaled by the group's spread: doubling the rewards doubles it
    doubled = compute_advantages(AdvantageInputs(rewards * 2), GRPOConfig(advantage="rloo"))
    assert torch.allclose(doubled, got * 2)


def test_every_estimator_takes_the_inputs_record_and_the_config():
    rewards = torch.tensor([[1.0, 0.0, 0.5]])
    for name in ADVANTAGES:
        advantages = compute_advantages(AdvantageInputs(rewards), GRPOConfig(advantage=name))
        assert advantages.shape == rewards.shape and advantages[0, 0] > 0 > advantages[0, 1], name


def test_advantages_need_groups_of_two_or_more():
    with pytest.raises(ValueError):
        compute_advantages(AdvantageInputs(torch.ones(4)), GRPOConfig())
    with pytest.raises(ValueError):
        compute_advantages(AdvantageInputs(torch.ones(4, 1)), GRPOConfig())


# ---------------------------------------------------------------------------
# Clipped surrogate, KL, aggregation

RATIOS = [0.5, 0.9, 1.0, 1.25, 1.5]


def _clip_case(advantage: float, eps_high: float):
    old = torch.zeros(1, len(RATIOS))
    logp = torch.tensor([RATIOS]).log().requires_grad_(True)
    out = ppo_clip(PolicyLossInputs(logp, old, torch.tensor([advantage])), GRPOConfig(clip_eps_low=0.2, clip_eps_high=eps_high))
    out.loss.sum().backward()
    return out, logp.grad[0]


def test_clipped_loss_with_clip_higher_on_hand_computed_ratios():
    out, grad = _clip_case(+1.0, eps_high=0.28)
    # A > 0: max(-r, -clip(r, 0.8, 1.28)); only the upper bound can bind
    assert out.loss[0].tolist() == pytest.approx([-0.5, -0.9, -1.0, -1.25, -1.28])
    assert out.high_clipped[0].tolist() == [False, False, False, False, True]
    assert not out.low_clipped.any()
    # d/dlogp of -A r is -A r; a clipped token passes no gradient
    assert grad.tolist() == pytest.approx([-0.5, -0.9, -1.0, -1.25, 0.0])

    out, grad = _clip_case(-1.0, eps_high=0.28)
    # A < 0: max(r, clip(r, 0.8, 1.28)); only the lower bound can bind
    assert out.loss[0].tolist() == pytest.approx([0.8, 0.9, 1.0, 1.25, 1.5])
    assert out.low_clipped[0].tolist() == [True, False, False, False, False]
    assert not out.high_clipped.any()
    assert grad.tolist() == pytest.approx([0.0, 0.9, 1.0, 1.25, 1.5])


def test_clip_higher_is_asymmetric():
    symmetric, grad = _clip_case(+1.0, eps_high=0.2)
    assert symmetric.loss[0, 3].item() == pytest.approx(-1.2) and grad[3] == 0, "r=1.25 is clipped at 1.2"
    higher, grad = _clip_case(+1.0, eps_high=0.28)
    assert higher.loss[0, 3].item() == pytest.approx(-1.25) and grad[3] != 0, "but not at 1.28"


def test_ratio_one_gives_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    out = ppo_clip(PolicyLossInputs(logp, logp.detach(), torch.tensor([0.7])), GRPOConfig(clip_eps_low=0.2, clip_eps_high=0.28))
    out.loss.sum().backward()
    assert out.loss[0].tolist() == pytest.approx([-0.7, -0.7])
    assert logp.grad[0].tolist() == pytest.approx([-0.7, -0.7])  # -A * grad log pi


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    assert k3_kl(logp, logp).abs().sum() == 0
    ref = logp + math.log(2.0)
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx([2 - math.log(2) - 1] * 2)
    assert (k3_kl(logp, logp - 3.0) > 0).all()


def test_token_and_sequence_aggregation():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    token_mean, seq_mean = LossAggregation.token_mean, LossAggregation.seq_mean
    tokens = aggregation_count(mask, token_mean)
    seqs = aggregation_count(mask, seq_mean)
    assert (tokens.item(), seqs.item()) == (4, 2), "an empty response is no sequence"
    assert aggregate(values, mask, token_mean, tokens).item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert aggregate(values, mask, seq_mean, seqs).item() == pytest.approx((2 + 4) / 2)
    # Shares computed on parts of the batch (micro-batches, processes) add up to the whole.
    for mode, count in ((token_mean, tokens), (seq_mean, seqs)):
        parts = sum(aggregate(values[i:i + 1], mask[i:i + 1], mode, count) for i in range(3))
        assert parts.item() == pytest.approx(aggregate(values, mask, mode, count).item())


def test_aggregation_over_no_tokens_is_zero_not_nan():
    """A mini-batch whose responses are all masked (all truncated under rl.mask_truncated) has nothing to average."""
    values = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    mask = torch.zeros(2, 2, dtype=torch.bool)
    for mode in LossAggregation:
        count = aggregation_count(mask, mode)
        assert count.item() == 0
        assert aggregate(values, mask, mode, count).item() == 0.0, mode
    # A NaN where the mask is off (a padded position) never leaks into the loss.
    mask[0, 0] = True
    assert aggregate(values, mask, LossAggregation.token_mean, aggregation_count(mask, LossAggregation.token_mean)).item() == 1.0


def test_a_nan_metric_is_said_on_the_console(tmp_path, capsys):
    from ntp_rl.tracking import Tracker

    class OneProcess:
        is_main_process = True

    with Tracker(OneProcess(), tmp_path, "disabled", stage="rl", run_name="r", group=None, tags=[], cfg=None,
                 resume_step=None, wandb_id=None, logger_cfg=None) as tracker:
        tracker.log({"policy_loss": float("nan"), "reward": 0.5}, step=3)
        tracker.log({"policy_loss": 1.0}, step=4)
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "step 3" in err and "policy_loss=nan" in err
    assert read_metrics(tmp_path)[0] == {"step": 3, "policy_loss": None, "reward": 0.5}


# ---------------------------------------------------------------------------
# Dynamic sampling


def _group(rewards):
    return Group(problem_id="p", prompt_ids=[1], responses=[[2]] * len(rewards), rewards=list(rewards),
                 correct=[r > 0 for r in rewards], truncated=[False] * len(rewards))


SIGNAL, FLAT = (1.0, 0.0), (0.0, 0.0)


def _rounds(*rounds):
    calls = []

    def sample_round(r):
        calls.append(r)
        return [_group(rw) for rw in rounds[r]]

    return sample_round, calls


def test_dynamic_sampling_drops_equal_reward_groups_and_samples_more():
    sample_round, calls = _rounds([SIGNAL, FLAT, FLAT, SIGNAL], [SIGNAL, FLAT, SIGNAL, SIGNAL], [SIGNAL] * 4)
    got = collect_groups(sample_round, target=4, dynamic=True, max_rounds=3)
    assert calls == [0, 1], "stops as soon as the batch is full"
    assert len(got.groups) == 4 and all(g.informative for g in got.groups)
    assert (got.rounds, got.dropped, got.filled, len(got.generated)) == (2, 3, 0, 8)


def test_dynamic_sampling_respects_the_cap_and_fills_with_equal_reward_groups():
    sample_round, calls = _rounds([SIGNAL, FLAT, FLAT, FLAT], [FLAT, FLAT, SIGNAL, FLAT], [SIGNAL] * 4)
    got = collect_groups(sample_round, target=4, dynamic=True, max_rounds=2)
    assert calls == [0, 1]
    assert [g.informative for g in got.groups] == [True, True, False, False]
    assert (got.rounds, got.dropped, got.filled) == (2, 4, 2)


def test_filler_groups_get_no_loss_and_do_not_dilute_the_token_mean():
    """When max_sampling_rounds runs out, the update must be the one the informative groups alone
    would give: the fillers' tokens count neither in the loss nor in its denominator."""
    sample_round, _ = _rounds([SIGNAL, FLAT, FLAT, FLAT], [FLAT, FLAT, SIGNAL, FLAT])
    got = collect_groups(sample_round, target=4, dynamic=True, max_rounds=2)
    assert got.trained(dynamic=True) == [True, True, False, False] and got.filled == 2
    groups = [Group("p", [1, 2], [[3, 4, 5], [6]], [1.0, 0.0], [True, False], [False, False]),
              Group("q", [1], [[7, 8], [9, 9, 9, 9]], [0.0, 0.0], [False, False], [False, False])]
    advantages = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    batch = build_batch(groups, advantages, pad_id=0, mask_truncated=False, trained=[True, False])
    alone = build_batch(groups[:1], advantages[:1], pad_id=0, mask_truncated=False)
    assert batch.response_mask[2:].sum() == 0, "a filler group has no token with a loss"
    values = torch.rand(batch.response_mask.shape)
    for mode in LossAggregation:
        count = aggregation_count(batch.response_mask, mode)
        assert count == aggregation_count(alone.response_mask, mode)
        width = alone.response_mask.shape[1]
        assert aggregate(values, batch.response_mask, mode, count).item() == pytest.approx(
            aggregate(values[:2, :width], alone.response_mask, mode, count).item())


@pytest.mark.parametrize("mini_batches", [1, 2, 4])
def test_each_update_holds_the_same_groups_whatever_the_number_of_processes(mini_batches):
    groups, per_update = 8, 8 // mini_batches

    def updates(world):
        shares = [deal_groups(groups, mini_batches, world, rank) for rank in range(world)]
        assert sorted(i for share in shares for i in share) == list(range(groups)), "every group exactly once"
        step = per_update // world
        return [[i for share in shares for i in share[m * step:(m + 1) * step]] for m in range(mini_batches)]

    worlds = [w for w in (1, 2, 4) if per_update % w == 0]
    assert all(updates(w) == updates(1) for w in worlds)
    # Groups kept first (the informative ones) are spread over the updates, the fillers over their ends.
    assert [sorted(u)[0] for u in updates(1)] == list(range(mini_batches))


def test_without_dynamic_sampling_one_round_is_trained_as_is():
    sample_round, calls = _rounds([SIGNAL, FLAT, FLAT, FLAT], [SIGNAL] * 4)
    got = collect_groups(sample_round, target=4, dynamic=False, max_rounds=3)
    assert calls == [0] and len(got.groups) == 4
    assert (got.dropped, got.filled) == (0, 0)


# ---------------------------------------------------------------------------
# Rollout plumbing


def test_prompt_stream_is_a_pure_function_of_position():
    pool = [TaskProblem(id=str(i), prompt=f"q{i}", answer=str(i)) for i in range(5)]
    stream = PromptStream(pool, seed=3)
    first = [p.id for p in stream.take(0, 12)]
    assert sorted(first[:5]) == sorted(first[5:10]) == [str(i) for i in range(5)], "each pass visits every prompt once"
    assert first[:5] != first[5:10], "reshuffled every pass"
    assert [p.id for p in PromptStream(pool, seed=3).take(7, 5)] == first[7:12]


def test_rollout_seeds_differ_by_step_round_and_offset():
    seeds = {rollout_seed(0, s, r, o) for s in range(3) for r in range(3) for o in (0, 8)}
    assert len(seeds) == 18 and all(0 <= s < 2**40 for s in seeds)
    # A pure function of its arguments, also in a fresh interpreter (str hash() is salted per process).
    code = "from ntp_rl.seeding import rollout_seed; print(rollout_seed(0, 1, 2, 8))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert int(other.stdout) == rollout_seed(0, 1, 2, 8)


def test_batch_masks_response_tokens_only():
    g = Group(problem_id="p", prompt_ids=[5, 6], responses=[[7, 8, 0], [9]], rewards=[1.0, 0.0], correct=[True, False],
              truncated=[False, True])
    batch = build_batch([g], torch.tensor([[0.5, -0.5]]), pad_id=1, mask_truncated=False)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 0], [5, 6, 9, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # label t is input t+1: the response's labels start at the prompt's last position
    assert batch.response_mask.tolist() == [[False, True, True, True], [False, True, False, False]]
    assert batch.advantages.tolist() == [0.5, -0.5]
    masked = build_batch([g], torch.tensor([[0.5, -0.5]]), pad_id=1, mask_truncated=True)
    assert masked.response_mask[1].sum() == 0, "a truncated response gets no loss"
    assert masked.rows(1, 2).input_ids.tolist() == [[5, 6, 9]], "rows are trimmed to their longest sequence"


def test_token_logprobs_match_an_unpadded_forward():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=17, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    groups = [Group("a", [3, 4, 5], [[6, 7], [8, 9, 10, 11]], [1.0, 0.0], [True, False], [False, False])]
    batch = build_batch(groups, torch.tensor([[1.0, -1.0]]), pad_id=0, mask_truncated=False)
    # chunks of 3 response tokens: the second row's 4 span two
    logp, entropy = token_logprobs(PolicyLogprobs(model, chunk_size=3), batch, temperature=0.7, with_entropy=True)
    for row, (prompt, response) in enumerate([([3, 4, 5], [6, 7]), ([3, 4, 5], [8, 9, 10, 11])]):
        ids = torch.tensor([prompt + response])
        logits = model(ids).logits[0, len(prompt) - 1:-1].double() / 0.7
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
        got = logp[row][batch.response_mask[row]]
        assert got.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
        probs = torch.softmax(logits, -1)
        assert entropy[row][batch.response_mask[row]].tolist() == pytest.approx(
            (-(probs * probs.log()).sum(-1)).tolist(), abs=1e-5)
    assert logp[~batch.response_mask].abs().sum() == 0


# ---------------------------------------------------------------------------
# Whole runs from a small pre-trained policy

# Difficulty 1 and a format bonus: the small policy's groups then mostly hold different rewards.
RL_TINY = [
    "task.difficulty=1", "task.format_reward=0.5", "rl.max_steps=4", "rl.prompts_per_step=4", "rl.num_mini_batches=2",
    "rl.num_generations=4",
    "rl.micro_batch_size=8", "rl.sampling.max_new_tokens=24", "rl.sampling.batch_size=8", "rl.train_problems=64",
    "rl.eval_problems=8", "rl.eval_samples=4", "rl.eval_ks=[1,4]", "rl.eval_every=2", "rl.save_every=2",
    "rl.eval_sampling.max_new_tokens=24", "optim.lr=1e-3", "logger.wandb.mode=disabled", "logger.progress_bar=false",
]

STEP_KEYS = ["reward", "reward_std", "accuracy", "frac_reward_zero_std", "dynamic_sampling/dropped_groups",
             "dynamic_sampling/rounds", "entropy", "completions/mean_length", "completions/max_length",
             "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "policy_loss", "grad_norm",
             "lr", "perf/gen_tokens_per_sec", "perf/train_tokens_per_sec", "perf/step_time_s"]


# Subprocesses (a killed run and its resumption, `accelerate launch`) use one thread each too.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are too small to gain from a second thread, and on a shared 2-core
    machine a thread waiting for a busy core makes them ten times slower; results do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, shared_cache) -> Path:
    """A pre-trained run small enough to train in seconds, yet one that writes "#### <number>" answers."""
    out = tmp_path_factory.mktemp("policy")
    overrides = [*TINY, f"out_dir={out}", f"data.cache_dir={shared_cache}", f"run_dir={out / 'run'}", "data.difficulty=1",
                 "data.seq_len=64", "train.batch_size=16", "train.micro_batch_size=16", "train.max_steps=60",
                 "train.eval_every=60", "train.save_every=60", "optim.lr=1e-2", "optim.warmup_steps=5"]
    run_stage("pretrain", compose("pretrain", overrides), overrides=overrides)
    return out / "run"


@pytest.fixture
def rl_args(policy, tmp_path) -> list[str]:
    return [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path / 'outputs'}"]


def rl_run(args):
    return run_stage("rl", compose("rl", args), overrides=args)


def step_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "reward" in r}


def eval_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "eval/avg@4" in r}


def test_a_run_logs_evaluates_and_saves_hf_checkpoints(rl_args, tmp_path):
    results = rl_run(rl_args)
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("run.json")]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["step"] == 4 and saved["task"] == "embedded"
    for when in ("eval_before", "eval_after"):
        assert {"avg@4", "pass@1", "pass@4", "mean_length"} <= set(saved[when]), when
    assert saved["eval_before"] == results["eval_before"]

    steps = step_rows(run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    for row in steps.values():
        for key in STEP_KEYS:
            assert key in row, key
        generated = row["dynamic_sampling/rounds"] * 4
        zero_std = round(row["frac_reward_zero_std"] * generated)
        assert row["dynamic_sampling/dropped_groups"] + row["dynamic_sampling/filled_groups"] == zero_std
        assert 0 <= row["accuracy"] <= 1 and row["entropy"] > 0 and row["grad_norm"] > 0
        assert 0 <= row["clip_ratio/low_mean"] <= 1 and 0 <= row["clip_ratio/high_mean"] <= 1
    filled = [row["dynamic_sampling/filled_groups"] for row in steps.values()]
    assert saved["dynamic_sampling"] == {"short_steps": sum(f > 0 for f in filled), "filled_groups": sum(filled),
                                         "groups_per_step": 4}
    assert sorted(eval_rows(run_dir)) == [0, 2, 4]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]

    code = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(m(**t('Question: What is 2 + 3?', return_tensors='pt')).logits.shape[-1], 'ntp_rl' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(latest_checkpoint(run_dir / "checkpoints"))], capture_output=True,
                         text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""}, check=True)
    assert out.stdout.split()[1] == "False"


def test_the_defaults_take_several_updates_per_rollout_batch(tmp_path):
    """With one update per rollout batch the ratio is exactly 1 and clip-higher never acts."""
    (tmp_path / "config.json").write_text("{}")
    rl = compose("rl", [f"init_from={tmp_path}"]).rl
    assert rl.num_mini_batches * rl.num_iterations > 1
    for processes in (1, 2, 4, 8):  # and the default batch splits over the usual process counts
        assert rl.prompts_per_step % (rl.num_mini_batches * processes) == 0


def test_the_default_first_update_through_the_chunked_head_equals_the_full_logits_one(policy, tmp_path, monkeypatch):
    """Issue 30: the default `rl` (its sampling, batch and update settings) from a pre-trained policy; its
    first update's old log-probs, loss and every gradient are the same through either LM head path."""
    from ntp_rl.rl import rollout
    from ntp_rl.stages import rl_update

    real_update = rl_update.update_minibatch

    def first_update(chunked: bool) -> dict:
        recorded = []

        def spy(state, minibatch, sums):
            applied = real_update(state, minibatch, sums)
            if not recorded:
                assert state.session.accelerator.unwrap_model(state.model).chunked is chunked
                recorded.append({"old_logp": minibatch.old_logp.clone(), "loss": sums["loss"].clone(),
                                 **{name: p.grad.clone() for name, p in state.lm.named_parameters()}})
            return applied

        monkeypatch.setattr(rl_update, "update_minibatch", spy)
        if not chunked:  # as for a head the chunked path cannot reproduce
            monkeypatch.setattr(rollout, "has_plain_linear_head", lambda lm: False)
        # Only the held-out checks are made small: they run before the first update and do not touch it.
        rl_run([f"init_from={policy}", f"out_dir={tmp_path}", f"run_dir={tmp_path / str(chunked)}", "rl.max_steps=1",
                "rl.eval_problems=2", "rl.eval_samples=2", "rl.eval_ks=[1]", "logger.wandb.mode=disabled",
                "logger.progress_bar=false"])
        monkeypatch.undo()
        return recorded[0]

    chunked, materialised = first_update(True), first_update(False)
    assert materialised["old_logp"].shape[0] == 64, "the default mini-batch: 8 prompts x 8 samples"
    assert set(chunked) == set(materialised)
    for key, want in materialised.items():
        assert torch.allclose(chunked[key], want, atol=1e-5, rtol=0), key


def test_rollout_calls_hold_a_sequence_count_with_hf_and_every_prompt_with_vllm(tmp_path):
    from ntp_rl.stages.rl_sample import rollout_prompts_per_call

    (tmp_path / "config.json").write_text("{}")
    common = [f"init_from={tmp_path}", "rl.num_generations=16", "rl.sampling.batch_size=64"]
    assert rollout_prompts_per_call(compose("rl", common), 32) == 4, "hf: 64 sequences a call"
    assert rollout_prompts_per_call(compose("rl", [*common, "rl.num_generations=128"]), 32) == 1
    vllm = [*common, "generator=vllm"]
    assert rollout_prompts_per_call(compose("rl", vllm), 32) == 32, "vllm: the round's prompts in one call"
    for args in (common, vllm):
        assert rollout_prompts_per_call(compose("rl", [*args, "rl.prompts_per_generate_call=3"]), 32) == 3


def test_one_update_per_rollout_batch_never_clips(rl_args):
    results = rl_run([*rl_args, "rl.max_steps=2", "rl.num_mini_batches=1", "rl.eval_every=10"])
    for row in step_rows(Path(results["checkpoint"]).parents[1]).values():
        assert row["clip_ratio/low_mean"] == row["clip_ratio/high_mean"] == 0, "one on-policy update: ratio 1"


def test_several_updates_per_step_with_kl_and_sequence_mean(rl_args, capsys):
    # One sampling round: some groups of a step have equal rewards, and the step trains without them.
    results = rl_run([*rl_args, "rl.max_steps=2", "rl.num_iterations=2", "rl.num_mini_batches=2", "rl.kl_coef=0.05",
                      "rl.loss_aggregation=seq_mean", "rl.mask_truncated=true", "optim.lr=1e-2", "rl.save_every=10",
                      "rl.eval_every=10", "rl.max_sampling_rounds=1"])
    run_dir = Path(results["checkpoint"]).parents[1]
    steps = step_rows(run_dir)
    filled = [steps[s]["dynamic_sampling/filled_groups"] for s in (1, 2)]
    assert results["dynamic_sampling"]["short_steps"] == sum(f > 0 for f in filled) > 0
    assert "the step trains on those alone" in capsys.readouterr().out
    # Later updates of a step see a policy that has moved: ratios leave 1 and the KL grows.
    assert all(steps[s]["kl"] > 0 for s in (1, 2))
    assert any(steps[s]["clip_ratio/low_mean"] + steps[s]["clip_ratio/high_mean"] > 0 for s in (1, 2))


def test_a_step_with_no_token_to_train_on_takes_no_update_and_says_so(rl_args, policy, tmp_path, capsys):
    """Every response cut at max_new_tokens under rl.mask_truncated: nothing to learn from, so no
    update (not a NaN loss, not a step on a zero gradient), counted and said."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "masked"
    results = rl_run([*rl_args, "rl.mask_truncated=true", "rl.sampling.max_new_tokens=2", "rl.dynamic_sampling=false",
                      "rl.max_steps=2", "rl.num_mini_batches=2", "rl.eval_every=10", f"run_dir={run_dir}"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    steps = step_rows(run_dir)
    for row in steps.values():
        assert row["completions/clipped_ratio"] == 1.0, "the case under test: every response truncated"
        assert all(value is not None for value in row.values()), row
        assert row["empty_mini_batches"] == 2
        assert "policy_loss" not in row and "grad_norm" not in row, "no update, so no loss to report"
    assert results["empty_mini_batches"] == 4
    out = capsys.readouterr().out
    assert "had no response token with a loss" in out
    # every response cut after 2 tokens: no answer, reward 0 everywhere, so every group has equal rewards
    assert results["notices"]["equal_reward_steps"] == 2
    assert "2 of 2 steps had equal rewards within every group: zero advantages, policy_loss 0" in out
    before = load_file(latest_checkpoint(policy / "checkpoints") / "model.safetensors")
    after = load_file(Path(results["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before), "the weights must not move"


def test_starting_from_an_unfinished_run_and_a_resume_that_finds_nothing_are_said(rl_args, policy, tmp_path, capsys):
    """rl from a run marked failed: allowed, but said with the checkpoint used; resume=auto with nothing to resume
    says that a new run starts. Both are kept in results.json's notices."""
    import shutil

    failed = tmp_path / "failed_run"
    shutil.copytree(policy, failed)
    info = json.loads((failed / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    args = [a for a in rl_args if not a.startswith("init_from=")]
    results = rl_run([*args, f"init_from={failed}", "rl.max_steps=1", "rl.eval_every=10", "resume=auto"])
    checkpoint = latest_checkpoint(failed / "checkpoints")
    assert results["notices"]["init_from_status"] == "failed"
    assert results["notices"]["resume_auto_found_nothing"] is True
    out = capsys.readouterr().out
    assert f"note: init_from={failed} is a run whose status is failed, not finished; using its checkpoint {checkpoint}" in out
    assert "note: resume=auto found no unfinished run of this command to resume; a new run starts in" in out


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_update(policy, tmp_path):
    from ntp_rl.metrics import Sums
    from ntp_rl.stages import rl as rl_stage
    from ntp_rl.stages import rl_update
    from ntp_rl.stages.session import StageSession
    from ntp_rl.tasks import build_task

    runs = {}
    for on in (False, True):
        args = [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path}", "rl.num_mini_batches=1",
                f"rl.gradient_checkpointing={str(on).lower()}"]
        cfg = compose("rl", args)
        session = StageSession("rl", cfg, args, precision=cfg.rl.precision)
        task = build_task(cfg.task)
        problems = task.problems("train", 4)
        lm, tokenizer, reference, model_dir = rl_stage.load_models(cfg, session, latest_checkpoint(policy / "checkpoints"))
        state = rl_stage.setup(cfg, session, task, lm, tokenizer, reference, problems, problems[:2], model_dir)
        # sampling still runs with the KV cache (the generator's eval mode) and is unchanged
        samples = state.rollouts.generate([problems[0].prompt], 2, state.sampling, seed=0)[0]
        calls = []
        # on a module inside the layer, as a pre-hook: transformers from 5.2x checkpoints the layer's forward, not
        # its __call__, so the layer's own hooks do not run again; the recompute stops once backward has what it needs
        state.lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        prompt = tokenizer(problems[0].prompt, add_special_tokens=False)["input_ids"]
        group = Group("p", prompt, [s.token_ids for s in samples], [1.0, 0.0], [True, False], [False, False])
        batch = build_batch([group], torch.tensor([[1.0, -1.0]]), tokenizer.pad_token_id, mask_truncated=False)
        assert rl_update.update_minibatch(state, batch, Sums(rl_update.STEP_SUMS, maxima=rl_update.STEP_MAXIMA))
        runs[on] = ([s.token_ids for s in samples], len(calls), {n: p.grad for n, p in state.lm.named_parameters()})
    assert runs[True][0] == runs[False][0]
    assert runs[False][1] == 1 and runs[True][1] == 2, "with the switch on, the layer runs again in backward"
    for name, want in runs[False][2].items():
        assert torch.allclose(runs[True][2][name], want, atol=1e-6), name


def test_truncated_importance_weights_scale_each_tokens_gradient_in_the_update(policy, tmp_path):
    """rl.tis_cap through the update path: when the engine's log-probs of the sampled tokens differ from the
    trainer's, each token's policy gradient is weighted by min(pi_trainer / pi_engine, cap). The gradient the
    stage's update leaves is checked against one written out by hand, and against the unweighted one."""
    from ntp_rl.models import load_pretrained
    from ntp_rl.stages import rl as rl_stage
    from ntp_rl.stages import rl_update
    from ntp_rl.stages.session import StageSession
    from ntp_rl.tasks import build_task

    cap = 2.0
    args = [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path}", "rl.num_mini_batches=1", "rl.num_iterations=1",
            "rl.kl_coef=0", f"rl.tis_cap={cap}", "rl.micro_batch_size=3", "rl.loss_aggregation=token_mean"]
    cfg = compose("rl", args)
    session = StageSession("rl", cfg, args, precision=cfg.rl.precision)
    task = build_task(cfg.task)
    problems = task.problems("train", 8)
    init_dir = latest_checkpoint(policy / "checkpoints")
    lm, tokenizer, reference, model_dir = rl_stage.load_models(cfg, session, init_dir)
    state = rl_stage.setup(cfg, session, task, lm, tokenizer, reference, problems, problems[:2], model_dir)
    assert not state.separate_old_pass, "one on-policy update: the trainer's log-probs are the old ones"

    # Two groups of four responses of different lengths, with advantages of both signs.
    generator = torch.Generator().manual_seed(0)
    groups = []
    for g, problem in enumerate(problems[:2]):
        prompt = tokenizer(problem.prompt, add_special_tokens=False)["input_ids"]
        responses = [torch.randint(3, len(tokenizer), (5 + 2 * j,), generator=generator).tolist() for j in range(4)]
        groups.append(Group(problem.id, prompt, responses, [1.0, 0.0, 0.0, 1.0], [False] * 4, [False] * 4,
                            logprobs=[[0.0] * len(r) for r in responses]))
    advantages = torch.tensor([[1.0, -0.5, -1.5, 0.75], [-1.0, 2.0, 0.5, -0.25]])
    batch = build_batch(groups, advantages, tokenizer.pad_token_id, mask_truncated=False)
    mask = batch.response_mask
    temperature = state.sampling.temperature

    def trainer_logp():  # by hand: the model's log-softmax of the sampled tokens at the sampling temperature
        logits = state.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1].float()
        picked = torch.log_softmax(logits / temperature, -1).gather(-1, batch.input_ids[:, 1:].unsqueeze(-1))
        return picked.squeeze(-1) * mask

    with torch.no_grad():
        logp = trainer_logp()
    # The engine's log-probs differ from the trainer's by -1.5..1.5 nats: weights from e^-1.5 to the cap.
    offsets = (torch.rand(mask.shape, generator=generator) * 3 - 1.5) * mask
    batch.rollout_logp = (logp - offsets) * mask
    weights = offsets.exp().clamp(max=cap) * mask
    assert (weights[mask] == cap).any() and (weights[mask] < 0.5).any(), "some weights capped, some small"

    def gradient(token_weights):  # of -mean over response tokens of A * w * log pi (ratio 1 at this update)
        state.optimizer.zero_grad(set_to_none=True)
        loss = -(batch.advantages.unsqueeze(-1) * token_weights * trainer_logp())[mask].sum() / mask.sum()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in state.lm.parameters() if p.grad is not None])

    expected, unweighted = gradient(weights), gradient(mask.float())
    state.optimizer.zero_grad(set_to_none=True)
    from ntp_rl.metrics import Sums

    sums = Sums(rl_update.STEP_SUMS, device=session.device, maxima=rl_update.STEP_MAXIMA)
    assert rl_update.update_minibatch(state, batch, sums)
    got = torch.cat([p.grad.flatten() for p in state.lm.parameters() if p.grad is not None])
    scale = expected.abs().max()
    assert (got - expected).abs().max() < 1e-4 * scale
    assert (unweighted - expected).abs().max() > 0.05 * scale, "the weights must change the gradient for this to test them"
    assert sums["is_ratio"].item() == pytest.approx(weights[mask].sum().item(), rel=1e-4)


def _poison_update(monkeypatch, bad_calls):
    """The policy loss turns NaN on the given calls (one call per mini-batch update here)."""
    from ntp_rl.rl import policy_loss

    clean, calls = policy_loss.POLICY_LOSSES["ppo_clip"], {"n": 0}

    def poisoned(inputs, rl):
        out = clean(inputs, rl)
        calls["n"] += 1
        return out if calls["n"] not in bad_calls else type(out)(out.loss * float("nan"), out.low_clipped, out.high_clipped)

    monkeypatch.setitem(policy_loss.POLICY_LOSSES, "ppo_clip", poisoned)


def test_a_non_finite_update_stops_the_run_by_default(rl_args, tmp_path, monkeypatch):
    from ntp_rl.errors import TrainingDiverged

    _poison_update(monkeypatch, {3})  # 2 updates a step, one micro-batch each: step 2 goes bad
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 2"):
        rl_run([*rl_args, "rl.save_every=1", f"run_dir={run_dir}"])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged" and "step_00000001" in info["error"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000001"]


def test_non_finite_updates_can_be_skipped_and_counted(rl_args, tmp_path, monkeypatch, capsys):
    _poison_update(monkeypatch, {3})
    results = rl_run([*rl_args, "rl.on_nonfinite=skip", "rl.eval_every=10", "rl.max_steps=3"])
    steps = step_rows(Path(results["checkpoint"]).parents[1])
    assert [steps[s]["nonfinite_skips"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(value is not None for row in steps.values() for value in row.values()), "the bad update is not averaged in"
    assert results["nonfinite_skips"] == 1 and "mini-batch update skipped" in capsys.readouterr().out

    _poison_update(monkeypatch, {1, 2})
    with pytest.raises(Exception, match="diverged at step 1"):
        rl_run([*rl_args, "rl.on_nonfinite=skip", "rl.max_nonfinite_skips=1", f"run_dir={tmp_path / 'two'}"])


def test_resume_after_sigkill_reproduces_the_run(rl_args, tmp_path):
    straight = tmp_path / "straight"
    rl_run([*rl_args, f"run_dir={straight}"])

    killed = tmp_path / "killed"
    args = ["rl", *rl_args, f"run_dir={killed}"]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": "step:3", **ONE_THREAD})
    assert first.returncode == -9, first.stderr[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert latest_checkpoint(killed / "checkpoints").name == "step_00000002"
    second = run_cli(*args, "resume=auto", env=ONE_THREAD)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout

    a, b = step_rows(straight), step_rows(killed)
    assert sorted(b) == [1, 2, 3, 4], "one record per step"
    for step in range(1, 5):
        for key in ("reward", "accuracy", "policy_loss", "grad_norm", "entropy", "completions/mean_length",
                    "dynamic_sampling/dropped_groups"):
            assert a[step][key] == b[step][key], (step, key)  # bit-identical on CPU
    assert eval_rows(straight)[4] == eval_rows(killed)[4]
    results = json.loads((killed / "results.json").read_text())
    assert results["eval_before"] == json.loads((straight / "results.json").read_text())["eval_before"]
    assert rl_run([*rl_args, f"run_dir={killed}", "resume=auto"]) == results, "a finished run is not run again"


def test_two_processes_match_one_with_the_same_global_batch(rl_args, tmp_path):
    # Two generate calls per round (2 prompts each), so each process makes exactly the calls
    # the single process makes for its half of the prompts.
    # The held-out checks: 4 chunks of 2 problems, dealt 2 to each process.
    common = [*rl_args, "rl.max_steps=3", "rl.save_every=3", "rl.eval_every=3", "rl.sampling.batch_size=8",
              "rl.eval_sampling.batch_size=8"]
    one = tmp_path / "one"
    rl_run([*common, f"run_dir={one}"])
    two = tmp_path / "two"
    # The two processes also group their rows by a token budget (about 2 rows a micro-batch, as many
    # micro-batches as each process's lengths need): neither the grouping nor the split changes an update.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ntp_rl", "rl", *common, f"run_dir={two}",
           "rl.max_tokens_per_micro_batch=100"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2
    a, b = step_rows(one), step_rows(two)
    for step in (1, 2, 3):
        for key in ("reward", "accuracy", "frac_reward_zero_std", "dynamic_sampling/dropped_groups",
                    "completions/mean_length"):
            assert b[step][key] == a[step][key], (step, key)  # the same rollouts
        for key in ("policy_loss", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
        assert 0 < a[step]["perf/useful_token_share"] <= b[step]["perf/useful_token_share"] <= 1, step
    assert eval_rows(two)[0] == eval_rows(one)[0], "the held-out check of the same model gives the same numbers"
    assert eval_rows(two)[3] == pytest.approx(eval_rows(one)[3])


@pytest.mark.parametrize(
    "args, names",
    [
        ([], ["init_from", "required"]),
        (["init_from=/no/such/run"], ["init_from=/no/such/run"]),
        (["rl.num_generations=1"], ["rl.num_generations"]),
        (["rl.clip_eps_low=1.5"], ["rl.clip_eps_low"]),
        (["rl.clip_eps_high=-0.1"], ["rl.clip_eps_high"]),
        (["rl.prompts_per_step=6", "rl.num_mini_batches=4"], ["rl.prompts_per_step", "rl.num_mini_batches"]),
        (["rl.advantage=ppo"], ["rl.advantage", "grpo"]),
        (["rl.policy_loss=nope"], ["rl.policy_loss", "ppo_clip"]),
        (["rl.loss_aggregation=sum"], ["rl.loss_aggregation", "token_mean", "seq_mean"]),
        (["rl.sampling.temperature=0"], ["rl.sampling.temperature"]),
        (["rl.eval_ks=[1,16]"], ["rl.eval_ks"]),
        (["rl.kl_coef=-1"], ["rl.kl_coef"]),
        (["rl.on_nonfinite=ignore"], ["rl.on_nonfinite", "stop", "skip"]),
        (["rl.max_nonfinite_skips=-1"], ["rl.max_nonfinite_skips"]),
        (["rl.max_tokens_per_micro_batch=0"], ["rl.max_tokens_per_micro_batch", "> 0"]),
        (["rl.logprob_chunk_size=0"], ["rl.logprob_chunk_size", "> 0"]),
        (["rl.prompts_per_generate_call=-2"], ["rl.prompts_per_generate_call", "> 0"]),
        (["task=nope"], ["task=nope", "chain_sum", "gsm8k"]),
        (["rl.num_generation=4"], ["rl.num_generation", "num_generations"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(args, names, tmp_path):
    init = [] if not args or args[0].startswith("init_from") else [f"init_from={tmp_path}"]
    (tmp_path / "config.json").write_text("{}")  # enough for init_from to look like a model directory
    with pytest.raises(UserError) as exc:
        check_command_line("rl", [*init, *args])
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml")))
def test_every_task_preset_composes_into_an_rl_run(preset, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check_command_line("rl", [f"init_from={tmp_path}", f"task={preset}"])
    assert compose("rl", [f"init_from={tmp_path}", f"task={preset}"]).task.name == preset


@pytest.mark.parametrize(
    "args, error",
    [
        (["task.kind=bogus"], "task.kind=bogus: unknown task kind; choose one of: embedded, hf_math, reasoning_gym"),
        (["task=chain_sum", "task.dataset=nope"], "task.dataset=nope: unknown reasoning-gym dataset; choose one of: "),
        (["task=chain_sum", "+task.dataset_kwargs.min_terms=9", "+task.dataset_kwargs.max_terms=2"], "task.dataset_kwargs="),
        (["task=gsm8k", "task.path=/no/such/dir"], "task.path=/no/such/dir: no such file or directory"),
        (["task=gsm8k", "task.path=/no/such/file.jsonl"], "task.path=/no/such/file.jsonl: no such file"),
    ],
)
def test_bad_task_is_refused_before_the_run_directory_exists(policy, tmp_path, args, error):
    out = tmp_path / "outputs"
    with pytest.raises(UserError) as exc:
        rl_run([*RL_TINY, f"init_from={policy}", f"out_dir={out}", *args])
    assert str(exc.value).startswith(error) and "\n" not in str(exc.value)
    assert not out.exists(), "a refused run must leave nothing behind"


def test_bad_input_from_the_shell_exits_2_with_one_line(policy, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli("rl", f"init_from={policy}", f"out_dir={out}", "task=chain_sum", "task.dataset=nope", env=ONE_THREAD)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("ntp-rl: error: task.dataset=nope: unknown reasoning-gym dataset; choose one of: ")
    assert not out.exists()


@pytest.mark.slow
def test_the_default_run_raises_held_out_accuracy(tmp_path):
    """The issue's promise, as a new user runs it: default pretrain, then default rl (~10 min on 2 cores)."""
    common = [f"out_dir={tmp_path}", "logger.wandb.mode=disabled", "logger.progress_bar=false"]
    pretrain = run_cli("pretrain", *common, timeout=1800)
    assert pretrain.returncode == 0, pretrain.stderr[-2000:]
    (pretrain_dir,) = (tmp_path / "pretrain").iterdir()
    rl = run_cli("rl", f"init_from={pretrain_dir}", *common, timeout=1800)
    assert rl.returncode == 0, rl.stderr[-2000:]
    (rl_dir,) = (tmp_path / "rl").iterdir()
    results = json.loads((rl_dir / "results.json").read_text())
    before, after = results["eval_before"]["avg@8"], results["eval_after"]["avg@8"]
    # Since the defaults take 4 updates per rollout batch (issue 13), the held-out gain at 60 steps is
    # small: CI measured 0.134 -> 0.143 (the README says so); it must still be a gain.
    assert after > before, (before, after)
    assert results["train_last_step"]["entropy"] < results["train_first_step"]["entropy"]
    steps = step_rows(rl_dir).values()
    assert any(row["clip_ratio/high_mean"] > 0 for row in steps) and any(row["clip_ratio/low_mean"] > 0 for row in steps), \
        "the default run's later updates move the policy far enough for both clip bounds to act"
