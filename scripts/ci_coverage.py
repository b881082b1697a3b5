"""How often do compare's intervals cover the truth at a study's sizes? A seeded simulation.

    python scripts/ci_coverage.py              # about a minute on one core
    python scripts/ci_coverage.py --reps 10000

Means over 3-10 seeds: the Student-t interval `ntp-rl compare` uses, against scipy's
bootstrap percentile interval. Rank correlations over 8-25 lineages: the Fisher-z interval
with Bonett & Wright's variance (compare's), Fisher's plain 1/(n-3) variance, and the
bootstrap percentile interval. A 95% interval should cover about 95% of the time; the
figures are in docs/studies.md (compare).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import stats

from ntp_rl.stats import spearman_interval


def mean_coverage(rng: np.random.Generator, reps: int) -> None:
    print("mean over seeds: coverage of 95% intervals")
    print(f"  {'seed-to-seed noise':44s} {'n':>3s} {'Student t':>10s} {'bootstrap':>10s}")
    cases = [("normal", lambda size: rng.normal(0.3, 0.05, size), 0.3),
             ("skewed: Avg@16 of one problem, p = 0.08", lambda size: rng.binomial(16, 0.08, size) / 16, 0.08)]
    for name, draw, truth in cases:
        for n in (3, 5, 10):
            x = draw((reps, n))
            mean, se = x.mean(axis=1), x.std(axis=1, ddof=1) / math.sqrt(n)
            half = stats.t.ppf(0.975, n - 1) * se
            t_cover = np.mean((mean - half <= truth) & (truth <= mean + half))
            boot = stats.bootstrap((x,), np.mean, axis=-1, method="percentile", n_resamples=2000, rng=rng,
                                   vectorized=True).confidence_interval
            boot_cover = np.mean((boot.low <= truth) & (truth <= boot.high))
            print(f"  {name:44s} {n:3d} {t_cover:10.3f} {boot_cover:10.3f}")


def spearman_coverage(rng: np.random.Generator, reps: int) -> None:
    print("Spearman's rho over lineages (bivariate normal): coverage of 95% intervals")
    print(f"  {'n':>3s} {'r':>4s} {'Bonett-Wright':>14s} {'plain Fisher':>13s} {'bootstrap':>10s}")
    for n in (8, 15, 25):
        for r in (0.0, 0.5, 0.8):
            truth = 6 / math.pi * math.asin(r / 2)  # Spearman's rho of a bivariate normal
            xy = rng.multivariate_normal([0, 0], [[1, r], [r, 1]], (reps, n))
            x, y = xy[..., 0], xy[..., 1]
            rho = _spearman(x, y)
            bonett_wright = np.array([spearman_interval(value, n) for value in rho])
            z, half = np.arctanh(np.clip(rho, -1 + 1e-12, 1 - 1e-12)), 1.959964 / math.sqrt(n - 3)
            boot = stats.bootstrap((x, y), _spearman, paired=True, axis=-1, vectorized=True, method="percentile",
                                   n_resamples=999, batch=50, rng=rng).confidence_interval
            cover = [np.mean((bonett_wright[:, 0] <= truth) & (truth <= bonett_wright[:, 1])),
                     np.mean((np.tanh(z - half) <= truth) & (truth <= np.tanh(z + half))),
                     np.mean((boot.low <= truth) & (truth <= boot.high))]
            print(f"  {n:3d} {r:4.1f} {cover[0]:14.3f} {cover[1]:13.3f} {cover[2]:10.3f}")


def _spearman(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Spearman's rho along the last axis: Pearson's r of the ranks, for many samples at once."""
    rx, ry = stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    return (rx * ry).sum(axis=axis) / np.sqrt((rx ** 2).sum(axis=axis) * (ry ** 2).sum(axis=axis))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4000, help="simulated studies per case")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    mean_coverage(rng, args.reps)
    spearman_coverage(rng, max(args.reps // 4, 100))


if __name__ == "__main__":
    main()
