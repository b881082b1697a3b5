"""ntp_rl.stats against scipy, hand-worked cases, brute force and seeded simulations."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from ntp_rl.stats import benjamini_hochberg, difference, holm, mean_ci, spearman, spearman_interval


def test_mean_ci_of_a_known_case():
    # 1, 2, 3: mean 2, s = 1, t(0.975, df=2) = 4.302653 (printed tables) -> 2 ± 4.302653 / sqrt(3)
    m = mean_ci([1.0, 2.0, 3.0])
    assert (m.n, m.mean, m.std) == (3, 2.0, 1.0)
    assert m.low == pytest.approx(2 - 2.484138, abs=1e-6) and m.high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert m.half_width == pytest.approx(2.484138, abs=1e-6)


def test_one_seed_has_no_interval_and_no_spread_has_a_point_interval():
    one = mean_ci([0.4])
    assert one.mean == 0.4 and math.isnan(one.low) and math.isnan(one.high)
    same = mean_ci([0.25, 0.25, 0.25])
    assert (same.low, same.high) == (0.25, 0.25)


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    for n in (3, 5):
        covered = sum(m.low <= 0.3 <= m.high for m in (mean_ci(rng.normal(0.3, 0.05, n)) for _ in range(4000)))
        # 4000 draws: the binomial standard error is 0.0034; a z-interval would cover 0.88 at n=5, 0.81 at n=3
        assert 0.935 <= covered / 4000 <= 0.965, (n, covered / 4000)


def test_paired_difference_is_scipys_paired_t_test_matched_by_seed():
    setting = [(2, 0.31), (0, 0.20), (1, 0.26), (3, 0.35)]  # seeds in another order than the baseline's
    baseline = [(0, 0.18), (1, 0.21), (2, 0.27), (3, 0.30)]
    result = difference(setting, baseline)
    a, b = [0.20, 0.26, 0.31, 0.35], [0.18, 0.21, 0.27, 0.30]
    reference = scipy_stats.ttest_rel(a, b)
    ci = reference.confidence_interval(0.95)
    assert result.test == "paired t" and result.n == 4
    assert result.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert result.p == pytest.approx(reference.pvalue) and (result.low, result.high) == pytest.approx((ci.low, ci.high))
    # Pairing by position instead of by seed would give another p-value:
    assert scipy_stats.ttest_rel([v for _, v in setting], b).pvalue != pytest.approx(result.p)


def test_unpaired_welch_test_when_the_seeds_differ():
    setting = [(0, 0.20), (1, 0.26), (2, 0.31)]
    baseline = [(0, 0.18), (1, 0.21), (5, 0.27), (6, 0.30)]
    result = difference(setting, baseline)
    reference = scipy_stats.ttest_ind([0.20, 0.26, 0.31], [0.18, 0.21, 0.27, 0.30], equal_var=False)
    ci = reference.confidence_interval(0.95)
    assert result.test == "Welch t" and (result.n, result.n_baseline) == (3, 4)
    assert result.p == pytest.approx(reference.pvalue) and (result.low, result.high) == pytest.approx((ci.low, ci.high))


def test_untestable_differences_say_why_instead_of_a_p_value():
    lone = difference([(0, 0.5)], [(0, 0.4), (1, 0.45)])
    assert lone.diff == pytest.approx(0.075) and math.isnan(lone.p) and "2 seeds" in lone.note
    constant = difference([(0, 0.5), (1, 0.6)], [(0, 0.4), (1, 0.5)])  # every seed +0.1
    assert constant.diff == pytest.approx(0.1) and math.isnan(constant.p) and "same difference" in constant.note


def test_holm_adjustment_of_a_hand_worked_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone: 0.06
    adjusted = holm([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06]) and adjusted[4] == pytest.approx(0.02)
    assert math.isnan(adjusted[3])  # untested: neither adjusted nor counted in the family
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6]) and holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_benjamini_hochberg_of_a_hand_worked_example():
    # sorted: 0.005 x 4/1 = 0.02, 0.01 x 4/2 = 0.02, 0.03 x 4/3 = 0.04, 0.04 x 4/4 = 0.04
    adjusted = benjamini_hochberg([0.01, 0.04, 0.03, math.nan, 0.005])
    assert adjusted[:3] == pytest.approx([0.02, 0.04, 0.04]) and adjusted[4] == pytest.approx(0.02)
    assert math.isnan(adjusted[3])


def test_spearman_of_constructed_data_with_known_answers():
    x = np.arange(1.0, 9.0)
    assert spearman(x, np.exp(x)).rho == pytest.approx(1.0)  # monotone, far from linear
    assert spearman(x, -x ** 3).rho == pytest.approx(-1.0)
    # 1..5 against 2,1,4,3,5: sum d^2 = 4, rho = 1 - 6*4/(5*24) = 0.8
    result = spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert result.rho == pytest.approx(0.8)
    # Exact two-sided permutation p by brute force over all 120 orders.
    rhos = [scipy_stats.spearmanr([1, 2, 3, 4, 5], order).statistic for order in itertools.permutations([2, 1, 4, 3, 5])]
    assert result.p == pytest.approx(np.mean(np.abs(rhos) >= 0.8 - 1e-12))
    assert math.isnan(spearman([1, 2, 3], [1, 1, 1]).rho)  # no spread: nothing to rank


def test_spearman_interval_covers_the_population_value():
    rng = np.random.default_rng(1)
    n, r = 20, 0.5
    truth = 6 / math.pi * math.asin(r / 2)  # Spearman's rho of a bivariate normal with correlation r
    covered = 0
    for _ in range(800):
        xy = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], n)
        low, high = spearman_interval(scipy_stats.spearmanr(xy[:, 0], xy[:, 1]).statistic, n)
        covered += low <= truth <= high
    assert 0.93 <= covered / 800 <= 0.985, covered / 800
    assert all(math.isnan(v) for v in spearman_interval(0.5, 3))  # needs n - 3 > 0


def test_paired_power_is_what_simulated_studies_reject_and_pairs_for_power_is_the_first_to_reach_it():
    """Power against brute force: 4000 simulated studies of normal pair differences, each tested with scipy's
    paired t-test, reject as often as the noncentral t says (within 2.5 binomial standard errors)."""
    from ntp_rl.stats import paired_power, pairs_for_power

    rng = np.random.default_rng(0)
    effect, sd, pairs, studies = 0.02, 0.03, 12, 4000
    base = rng.normal(0.3, 0.05, size=(studies, pairs))
    treated = base + rng.normal(effect, sd, size=(studies, pairs))
    rejected = (scipy_stats.ttest_rel(treated, base, axis=1).pvalue < 0.05).mean()
    predicted = paired_power(effect, sd, pairs)
    assert abs(rejected - predicted) < 2.5 * math.sqrt(predicted * (1 - predicted) / studies), (rejected, predicted)
    assert 0.4 < predicted < 0.7  # a case where the answer is not trivially 0 or 1

    needed = pairs_for_power(effect, sd)
    assert paired_power(effect, sd, needed) >= 0.8 > paired_power(effect, sd, needed - 1)
    # Two comparisons under Holm ask the smallest p to pass 0.025: more pairs, never fewer.
    with_holm = pairs_for_power(effect, sd, comparisons=2)
    assert paired_power(effect, sd, with_holm, alpha=0.025) >= 0.8 and with_holm > needed
    assert pairs_for_power(-effect, sd) == needed  # the direction does not matter to a two-sided test
    with pytest.raises(ValueError):
        pairs_for_power(0.0, sd)
