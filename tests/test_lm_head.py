"""RL's log-probs through the chunked LM head equal the materialised path's: values, entropy, the
loss and every parameter's gradient of a whole update (old-log-prob pass, KL, TIS included)."""

import copy
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

from ntp_rl.config.schema import GRPOConfig
from ntp_rl.generation import Sampling
from ntp_rl.lm_head import logits_in_chunks, token_logprobs_fused
from ntp_rl.metrics import Sums
from ntp_rl.rl.rollout import Group, PolicyLogprobs, RolloutBatch, build_batch, plan_micro_batches, split_plan
from ntp_rl.stages import rl_update

VOCAB = 61


def tiny_lm(tied: bool) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                      tie_word_embeddings=tied))
    with torch.no_grad():  # a peaked, uneven distribution, unlike a fresh init's near-uniform one
        lm.get_output_embeddings().weight.normal_(0, 0.5)
    return lm


def rollout_batch(engine_logprobs: bool) -> RolloutBatch:
    """Two groups of three responses of different lengths (so rows are padded), advantages of both signs."""
    gen = torch.Generator().manual_seed(1)
    groups = []
    for g, prompt_len in enumerate((3, 5)):
        prompt = torch.randint(1, VOCAB, (prompt_len,), generator=gen).tolist()
        responses = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (4, 9, 2)]
        logprobs = [(-torch.rand(len(r), generator=gen) * 5).tolist() for r in responses] if engine_logprobs else None
        groups.append(Group(f"p{g}", prompt, responses, [1.0, 0.0, 0.5], [True, False, False], [False] * 3, logprobs))
    advantages = torch.tensor([[1.0, -1.0, 0.2], [-0.5, 0.7, -0.3]])
    return build_batch(groups, advantages, pad_id=0, mask_truncated=False)


def test_fused_log_probs_and_entropy_equal_a_full_log_softmax():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(VOCAB, 8, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, VOCAB, (13,))
    upstream = torch.randn(13, dtype=torch.float64)
    logp, entropy = token_logprobs_fused(hidden, weight, targets, temperature=0.6, chunk_size=4, with_entropy=True)
    grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))

    log_probs = torch.log_softmax(hidden @ weight.t() / 0.6, dim=-1)
    expected = log_probs.gather(1, targets[:, None]).squeeze(1)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    assert torch.allclose(logp.double(), expected, atol=1e-5)  # the log-probs are fp32, as today's
    assert torch.allclose(entropy.double(), -(log_probs.exp() * log_probs).sum(-1), atol=1e-5)
    assert not entropy.requires_grad, "the entropy is a metric"
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-5)


def run_update(lm: torch.nn.Module, reference, chunked: bool, rl: GRPOConfig, temperature: float, batch) -> dict:
    """The stage's own old-log-prob pass and one mini-batch update, on the chunked or the materialised path."""
    from accelerate import Accelerator

    lm = copy.deepcopy(lm)
    model = PolicyLogprobs(lm, chunk_size=5)
    model.chunked = chunked
    if reference is not None:
        reference = PolicyLogprobs(copy.deepcopy(reference), chunk_size=5)
        reference.chunked = chunked
    state = SimpleNamespace(cfg=SimpleNamespace(rl=rl), model=model, lm=lm, reference=reference,
                            sampling=Sampling(temperature, 1.0, 16), separate_old_pass=rl.num_mini_batches > 1,
                            session=SimpleNamespace(accelerator=Accelerator(cpu=True), world=1, device=torch.device("cpu"),
                                                    gradient_sync=lambda model, sync: nullcontext()))
    batch = copy.deepcopy(batch)
    sums = Sums(rl_update.STEP_SUMS, maxima=rl_update.STEP_MAXIMA)
    rl_update.old_logprobs(state, batch, sums)
    assert rl_update.update_minibatch(state, batch, sums)
    return {"old_logp": batch.old_logp, "ref_logp": batch.ref_logp, "sums": {k: sums[k].item() for k in sums.names},
            "grads": {name: p.grad for name, p in lm.named_parameters()}}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("setting", ["one_update", "old_pass_kl_tis"])
def test_an_update_through_the_chunked_head_equals_the_materialised_one(tied, setting):
    lm = tiny_lm(tied)
    if setting == "one_update":  # the current log-probs are the old ones: entropy comes from the update's own pass
        rl, reference, batch = GRPOConfig(num_mini_batches=1, micro_batch_size=4), None, rollout_batch(False)
    else:  # a separate old-log-prob pass, a KL term to a reference that differs, TIS against engine log-probs
        rl = GRPOConfig(num_mini_batches=2, micro_batch_size=4, kl_coef=0.3, tis_cap=1.5)
        reference, batch = copy.deepcopy(lm), rollout_batch(True)
        with torch.no_grad():  # near the policy, as a reference is a few steps into a run
            for p in reference.parameters():
                p.mul_(1 + 0.05 * torch.randn_like(p))
    chunked = run_update(lm, reference, True, rl, 0.7, batch)
    materialised = run_update(lm, reference, False, rl, 0.7, batch)
    for key in ("old_logp", "ref_logp"):
        if materialised[key] is not None:
            assert torch.allclose(chunked[key], materialised[key], atol=1e-5), key
    assert materialised["sums"]["tokens"] > 0 and materialised["sums"]["entropy"] > 0
    if setting != "one_update":
        assert materialised["sums"]["kl"] > 0 and materialised["sums"]["is_clipped"] > 0, "KL and TIS both act"
    for key, want in materialised["sums"].items():
        # sums over a batch's tokens reach the hundreds, where fp32's spacing is 3e-5: summed in another
        # order they differ in the last bits (seen on an AVX512 machine), so the tolerance is relative
        assert chunked["sums"][key] == pytest.approx(want, rel=1e-6, abs=1e-5), key
    grads = materialised["grads"]
    assert set(chunked["grads"]) == set(grads)
    for name, want in grads.items():
        assert want is not None and want.abs().sum() > 0, name
        assert torch.allclose(chunked["grads"][name], want, atol=1e-5), name



@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_held_out_text_logits_in_chunks_are_the_models_logits(tied):
    lm = tiny_lm(tied)
    ids = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(2))
    parts = list(logits_in_chunks(lm, ids, chunk_size=7))
    assert [p.stop - p.start for p, _ in parts] == [7, 7, 7, 7, 5] and all(z.shape[0] <= 7 for _, z in parts)
    with torch.no_grad():
        full = lm(input_ids=ids).logits.reshape(-1, VOCAB)
    assert torch.allclose(torch.cat([z for _, z in parts]), full, atol=1e-5)


def test_micro_batches_by_tokens_pack_rows_of_like_length():
    lengths = [5, 12, 7, 12, 3, 9]
    assert plan_micro_batches(lengths, 4, None) == [[0, 1, 2, 3], [4, 5]], "by rows: in order"
    plan = plan_micro_batches(lengths, 4, 24)
    assert plan == [[1, 3], [5, 2], [0, 4]], "longest first, rows x longest <= 24"
    assert plan_micro_batches(lengths, 4, 1) == [[1], [3], [5], [2], [0], [4]], "a row longer than the budget goes alone"
    assert split_plan(plan, 5) == [[1], [3], [5], [2], [0, 4]] and split_plan(plan, 3) == plan
    with pytest.raises(ValueError):
        split_plan(plan, 7)


@pytest.mark.parametrize("budget", [1, 20, 40, 10**6], ids=["one_row", "some_rows", "more_rows", "whole_batch"])
def test_the_update_is_the_same_whatever_the_token_budget(budget):
    """Rows grouped one per micro-batch, all in one, or anything between: one update (KL and an old pass on)."""
    lm = tiny_lm(tied=False)
    reference = copy.deepcopy(lm)
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
    batch = rollout_batch(False)
    by_rows = run_update(lm, reference, True, GRPOConfig(num_mini_batches=2, micro_batch_size=6, kl_coef=0.3), 1.0, batch)
    rl = GRPOConfig(num_mini_batches=2, micro_batch_size=6, kl_coef=0.3, max_tokens_per_micro_batch=budget)
    by_tokens = run_update(lm, reference, True, rl, 1.0, batch)
    for key in ("old_logp", "ref_logp"):  # written back to each row's own place
        assert torch.allclose(by_tokens[key], by_rows[key], atol=1e-6), key
    for key, want in by_rows["sums"].items():
        if key not in ("micro_tokens", "micro_slots"):
            assert by_tokens["sums"][key] == pytest.approx(want, abs=1e-5), key
    tokens, slots = by_tokens["sums"]["micro_tokens"], by_tokens["sums"]["micro_slots"]
    assert tokens == by_rows["sums"]["micro_tokens"] == batch.attention_mask.sum()
    if budget == 1:
        assert slots == tokens, "one row per micro-batch carries no padding"
    assert slots <= by_rows["sums"]["micro_slots"], "sorted by length, never more padding than in order"
    for name, want in by_rows["grads"].items():
        assert torch.allclose(by_tokens["grads"][name], want, atol=1e-5), name


def test_under_bf16_autocast_the_head_computes_in_bf16_as_the_models_own_does():
    lm = tiny_lm(tied=False)
    batch = rollout_batch(False)
    out = {}
    for chunked in (True, False):
        model = PolicyLogprobs(copy.deepcopy(lm), chunk_size=4)
        model.chunked = chunked
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp, entropy = model(batch.input_ids, batch.attention_mask, batch.response_mask, 0.7, with_entropy=True)
        logp.sum().backward()
        out[chunked] = logp, entropy, model.lm.get_output_embeddings().weight.grad
    assert out[True][0].dtype == torch.float32
    for got, want in zip(out[True], out[False]):
        assert torch.allclose(got, want, rtol=2e-2, atol=2e-2), "both round the logits to bf16"
    exact = PolicyLogprobs(lm, chunk_size=4)(batch.input_ids, batch.attention_mask, batch.response_mask, 0.7)[0]
    assert (out[True][0] - exact).abs().max() > 1e-4, "autocast reached the chunked head"
