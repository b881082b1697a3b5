"""Next-token diagnostics against brute force, against the loss's own statistics, and on known distributions."""

import math

import pytest
import torch

from ntp_rl.diagnostics import TextDiagnostics
from ntp_rl.losses import RewardShaping, shaped_ntp_loss, token_statistics


def random_logits(tokens=300, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g) * 3
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    return logits, targets


def test_token_stats_match_brute_force():
    logits, targets = random_logits(tokens=40, vocab=12)
    stats = token_statistics(logits, targets, k=3)
    for i in range(len(targets)):
        p = torch.softmax(logits[i].double(), -1)
        t = int(targets[i])
        order = sorted(range(12), key=lambda j: -p[j].item())
        # fp32 log-probs are z - logsumexp(z): with logits near 10 that difference carries about 1e-6 of
        # absolute error (the loss computes them so, in place, to save memory), hence abs as well as rel.
        assert stats["nll"][i].item() == pytest.approx(-math.log(p[t]), rel=1e-5, abs=1e-6)
        assert stats["entropy"][i].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-5, abs=1e-6)
        assert stats["target_rank"][i].item() == order.index(t) + 1
        assert stats["topk_mass"][i].item() == pytest.approx(sum(p[j].item() for j in order[:3]), rel=1e-5)


def test_means_agree_with_the_losses_statistics():
    logits, targets = random_logits()
    meter = TextDiagnostics(vocab_size=50, k=5, forking_threshold=1.0, bins=10)
    meter.add(logits, targets, chunk_size=64)
    result = meter.result()
    stats = shaped_ntp_loss(logits, targets, RewardShaping(k=5)).stats
    for name in ("nll", "entropy", "accuracy", "target_prob", "topk_mass", "tail_mass"):
        assert result[name] == pytest.approx(stats[name].item(), rel=1e-5, abs=1e-7), name
    assert result["tokens"] == 300 and result["ppl"] == pytest.approx(math.exp(result["nll"]))


def test_shares_add_up_to_the_whole():
    """What each process measures, summed, is what one process measures on all of it."""
    logits, targets = random_logits()
    whole = TextDiagnostics(50, 5, 1.0, 10)
    whole.add(logits, targets)
    parts = [TextDiagnostics(50, 5, 1.0, 10) for _ in range(3)]
    for i, part in enumerate(parts):
        part.add(logits[i::3], targets[i::3])
    summed = TextDiagnostics(50, 5, 1.0, 10)
    summed.state = sum(p.state for p in parts)
    a, b = whole.result(), summed.result()
    assert a["entropy_histogram"] == b["entropy_histogram"]
    assert (a["target_rank_median"], a["target_rank_p90"], a["tokens"]) == (b["target_rank_median"], b["target_rank_p90"], b["tokens"])
    for key in ("nll", "entropy", "forking_share", "target_rank_mean", "target_in_topk"):
        assert a[key] == pytest.approx(b[key], rel=1e-6), key  # fp32 sums in another order


def test_rank_quantiles_forking_share_and_histogram():
    vocab = 8
    ranks = [1, 1, 1, 2, 5, 8]
    # One strictly ordered distribution (token 0 likeliest); token r-1 is the target of rank r.
    logits = torch.arange(vocab, 0, -1).float().expand(len(ranks), vocab)
    targets = torch.tensor(ranks) - 1
    meter = TextDiagnostics(vocab, k=2, forking_threshold=0.0, bins=4)
    meter.add(logits, targets)
    result = meter.result()
    assert result["target_rank_median"] == 1 and result["target_rank_p90"] == 8
    assert result["target_rank_mean"] == pytest.approx(18 / 6)
    assert result["target_in_topk"] == pytest.approx(4 / 6) and result["accuracy"] == pytest.approx(3 / 6)
    assert result["forking_share"] == 1.0  # every entropy is > 0
    entropy = token_statistics(logits[:1], targets[:1], 2)["entropy"].item()
    edges, counts = result["entropy_histogram"]["edges"], result["entropy_histogram"]["counts"]
    assert len(edges) == 5 and edges[-1] == pytest.approx(math.log(vocab)) and sum(counts) == 6
    assert counts[int(entropy / math.log(vocab) * 4)] == 6


def test_uniform_and_certain_distributions_give_known_values():
    vocab = 16
    meter = TextDiagnostics(vocab, k=4, forking_threshold=0.5, bins=8)
    meter.add(torch.zeros(10, vocab), torch.arange(10))  # uniform: every token ties for first
    uniform = meter.result()
    assert uniform["nll"] == pytest.approx(math.log(vocab)) and uniform["ppl"] == pytest.approx(vocab)
    assert uniform["entropy"] == pytest.approx(math.log(vocab)) and uniform["forking_share"] == 1.0
    assert uniform["topk_mass"] == pytest.approx(4 / vocab) and uniform["target_rank_median"] == 1
    assert uniform["entropy_histogram"]["counts"][-1] == 10

    certain = TextDiagnostics(vocab, k=1, forking_threshold=0.5, bins=8)
    logits = torch.full((5, vocab), float("-inf"))
    logits[:, 3] = 0.0  # all mass on token 3; -inf elsewhere must not give NaN
    certain.add(logits, torch.full((5,), 3))
    result = certain.result()
    assert result["nll"] == 0.0 and result["entropy"] == 0.0 and result["forking_share"] == 0.0
    assert result["tail_mass"] == 0.0 and result["accuracy"] == 1.0


def test_k_beyond_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="k must be in 1..8"):
        TextDiagnostics(8, k=9, forking_threshold=0.5, bins=4)
