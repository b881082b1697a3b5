"""The statistics behind `ntp-rl compare`: intervals over seeds, tests against a baseline, rank correlations.

A study has 3-10 seeds per setting, so every interval and test here is one that holds at
that size: Student-t intervals and t-tests (exact under normal seed-to-seed noise, and
close to nominal for the near-normal averages of many problems that Avg@n and pass@k are),
not bootstrap percentile intervals, which under-cover badly with 3-5 values
(scripts/ci_coverage.py measures both). The distributions and tests are scipy's; this
module only chooses between them and handles the degenerate cases (one seed, no spread).

Imports nothing of the project, so plots and tables can both use it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
# Monte-Carlo permutations for a Spearman p-value; exact (every permutation) when n! is smaller.
PERMUTATIONS = 9999


@dataclass(frozen=True)
class MeanCI:
    """The mean of one metric over seeds and its Student-t confidence interval."""

    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one value
    low: float  # nan when n < 2: one seed says nothing about the spread
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> MeanCI:
    """Mean ± t_{(1+c)/2, n-1} · s/√n: exact for normal noise, the standard choice for few seeds."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return MeanCI(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return MeanCI(1, mean, 0.0, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0.0:  # scipy's interval is nan for zero scale; every seed agrees exactly
        return MeanCI(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=std / math.sqrt(n))
    return MeanCI(n, mean, std, float(low), float(high))


@dataclass(frozen=True)
class Difference:
    """A setting's mean minus the baseline's, with its interval and a two-sided t-test."""

    test: str  # "paired t", "Welch t", or "" when no test is possible
    n: int  # seeds of the setting (pairs, for the paired test)
    n_baseline: int
    diff: float
    low: float
    high: float
    p: float  # nan when untestable; see `note`
    note: str = ""


def difference(values: Sequence[tuple[Optional[int], float]], baseline: Sequence[tuple[Optional[int], float]],
               confidence: float = CONFIDENCE) -> Difference:
    """`values` minus `baseline`, each a list of (seed, value).

    Paired by seed (scipy's ttest_rel) when both hold the same distinct seeds: runs with one
    seed share initialisation and data order, so pairing removes that shared noise. Any other
    overlap uses Welch's unpaired test (ttest_ind, equal_var=False) on every run, rather
    than throwing the unmatched seeds away.
    """
    seeds_a, a = [s for s, _ in values], np.asarray([v for _, v in values], dtype=float)
    seeds_b, b = [s for s, _ in baseline], np.asarray([v for _, v in baseline], dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if _same_distinct_seeds(seeds_a, seeds_b) and len(a) >= 2:
        order_b = {s: v for s, v in zip(seeds_b, b)}
        paired_b = np.asarray([order_b[s] for s in seeds_a])
        if np.ptp(a - paired_b) == 0.0:
            return Difference("paired t", len(a), len(b), diff, diff, diff, math.nan,
                              "the same difference on every seed: no spread to test")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = stats.ttest_rel(a, paired_b)
        ci = result.confidence_interval(confidence)
        return Difference("paired t", len(a), len(b), diff, float(ci.low), float(ci.high), float(result.pvalue))
    if len(a) < 2 or len(b) < 2:
        return Difference("", len(a), len(b), diff, math.nan, math.nan, math.nan, "a test needs 2 seeds on each side")
    if np.ptp(a) == 0.0 and np.ptp(b) == 0.0:
        return Difference("Welch t", len(a), len(b), diff, diff, diff, math.nan,
                          "no spread on either side: nothing to test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(confidence)
    return Difference("Welch t", len(a), len(b), diff, float(ci.low), float(ci.high), float(result.pvalue))


def paired_power(effect: float, sd: float, pairs: int, alpha: float = ALPHA) -> float:
    """Power of a two-sided paired t-test at level `alpha` with `pairs` pairs, when the true mean difference is
    `effect` and the pair differences have standard deviation `sd`: P(|T| > t(1 - alpha/2, n - 1)) for T a
    noncentral t with n - 1 degrees of freedom and noncentrality effect / sd * sqrt(n) (normal differences)."""
    if pairs < 2:
        return math.nan
    df = pairs - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    noncentrality = effect / sd * math.sqrt(pairs)
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))


def pairs_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = ALPHA, comparisons: int = 1,
                    most: int = 10_000) -> int:
    """The fewest seed pairs for which a paired t-test detects a true difference `effect` (pair differences of
    standard deviation `sd`, from a pilot) with probability `power`. With `comparisons` tests adjusted by Holm
    (compare's family: each setting against the baseline), a difference is certain to be declared only when
    its p-value passes alpha / comparisons, the bar Holm sets the smallest one, so that is the level used:
    the answer holds whichever of the comparisons turns out smallest."""
    if effect == 0 or sd <= 0 or comparisons < 1:
        raise ValueError("pairs_for_power needs a non-zero effect, a positive sd and at least one comparison")
    for pairs in range(2, most + 1):
        if paired_power(abs(effect), sd, pairs, alpha / comparisons) >= power:
            return pairs
    raise ValueError(f"more than {most} pairs needed for power {power}")


def _same_distinct_seeds(a: Sequence[Optional[int]], b: Sequence[Optional[int]]) -> bool:
    known = None not in a and None not in b
    return known and len(set(a)) == len(a) and len(set(b)) == len(b) and set(a) == set(b)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error); nan p-values stay nan and are not counted.

    scipy has no Holm; the procedure is an ordering, not a distribution: the i-th smallest of
    m p-values is multiplied by (m - i), running maxima keep the order, capped at 1.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, math.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    running = 0.0
    for rank, index in enumerate(tested[np.argsort(p[tested], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """scipy's Benjamini-Hochberg adjustment (false discovery rate); nan p-values stay nan."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, math.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = stats.false_discovery_control(p[tested], method="bh")
    return adjusted.tolist()


ADJUSTMENTS = {"holm": holm, "bh": benjamini_hochberg, "none": lambda p: [float(x) for x in p]}


@dataclass(frozen=True)
class Correlation:
    """Spearman's rank correlation with a Fisher-z interval and a permutation p-value."""

    n: int
    rho: float
    low: float  # nan when n < 4 (the interval needs n - 3 > 0)
    high: float
    p: float


def spearman(x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> Correlation:
    """Spearman's rho of paired values.

    Interval: Fisher's z = atanh(rho) with Bonett & Wright's (2000) variance (1 + rho²/2)/(n - 3),
    which fits Spearman's rho where Pearson's 1/(n - 3) is too narrow; it needs no resampling,
    which is unreliable at 10-30 points. p-value: a permutation test of the pairing (scipy's
    permutation_test), exact when n! <= PERMUTATIONS, so it holds for few lineages too.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 3 or np.ptp(x) == 0.0 or np.ptp(y) == 0.0:
        return Correlation(n, math.nan, math.nan, math.nan, math.nan)
    rho = float(stats.spearmanr(x, y).statistic)
    low, high = spearman_interval(rho, n, confidence)
    return Correlation(n, rho, low, high, _permutation_p(x, y, seed))


def spearman_interval(rho: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Fisher-z interval for Spearman's rho with Bonett & Wright's variance; (nan, nan) when n < 4."""
    if n < 4 or math.isnan(rho):
        return math.nan, math.nan
    z = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, rho)))  # |rho| = 1 gives the degenerate [rho, rho]
    half = stats.norm.ppf((1 + confidence) / 2) * math.sqrt((1 + rho ** 2 / 2) / (n - 3))
    return math.tanh(z - half), math.tanh(z + half)


def _permutation_p(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    rank_x = stats.rankdata(x)

    def statistic(ys: np.ndarray, axis: int = -1) -> np.ndarray:
        # Pearson's r of the ranks is Spearman's rho; vectorized over the permutations.
        rank_y = stats.rankdata(ys, axis=axis)
        dx = rank_x - rank_x.mean()
        dy = rank_y - rank_y.mean(axis=axis, keepdims=True)
        return (dy * dx).sum(axis=axis) / np.sqrt((dx ** 2).sum() * (dy ** 2).sum(axis=axis))

    result = stats.permutation_test((y,), statistic, permutation_type="pairings", n_resamples=PERMUTATIONS,
                                    vectorized=True, rng=np.random.default_rng(seed))
    return float(result.pvalue)
