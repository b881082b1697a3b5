"""pass@k against brute force over all k-subsets, and deterministic majority votes."""

from itertools import combinations

import pytest

from ntp_rl.metrics import majority_vote, pass_at_k


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_of_every_k_subset(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_at_paper_scale():
    value = pass_at_k(128, 3, 64)
    assert 0.0 < value < 1.0
    assert value == pytest.approx(1 - (64 * 63 * 62) / (128 * 127 * 126), rel=1e-12)
    assert pass_at_k(128, 0, 64) == 0.0 and pass_at_k(128, 128, 1) == 1.0
    assert pass_at_k(128, 5, 1) == pytest.approx(5 / 128)


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"  # no answer never wins
    assert majority_vote(["7", "5", "5", "7"]) == "7"  # tie: the first to appear
    assert majority_vote(["5", "7", "7", "5"]) == "5"
    assert majority_vote([None, None]) is None and majority_vote([]) is None
