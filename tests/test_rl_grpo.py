"""`ntp-rl rl`'s GRPO pieces on hand-computed cases: advantages, the clipped surrogate, KL, aggregation,
dynamic sampling and the rollout plumbing."""

import math
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from ntp_rl.config.schema import GRPOConfig, LossAggregation
from ntp_rl.rl.advantages import ADVANTAGES, AdvantageInputs, compute_advantages
from ntp_rl.rl.policy_loss import PolicyLossInputs, aggregate, aggregation_count, k3_kl, ppo_clip
from ntp_rl.rl.rollout import (Group, PolicyLogprobs, PromptStream, build_batch, collect_groups, deal_groups,
                               token_logprobs)
from ntp_rl.seeding import rollout_seed
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
