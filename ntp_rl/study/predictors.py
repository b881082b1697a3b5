"""What in a pre-trained model predicts how much RL gains from it (PAPER.md's question).

Across every lineage with an eval before and after RL, each pre-RL diagnostic is set
against the gain RL brought (after minus before, in Avg@n and in pass@k at the largest k):
Spearman's rank correlation, because the relation need not be linear and a few lineages
must not dominate; its interval and p-value come from ntp_rl.stats. All pairs form one
family, adjusted with Benjamini-Hochberg: this is a screen for candidates, where a false
discovery rate is the useful guarantee (docs/studies.md says more).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ntp_rl.stats import ALPHA, Correlation, benjamini_hochberg, spearman
from ntp_rl.study.records import Record


@dataclass(frozen=True)
class Predictor:
    name: str
    read: Callable[[Record], Any]
    # Measured on the same sampled answers as the gain's "before" term: its correlation with
    # the gain carries that measurement's noise with opposite signs (regression to the mean).
    shares_samples: bool = False


def _diagnostic(key: str) -> Callable[[Record], Any]:
    return lambda r: (r.results("eval_base").get("diagnostics") or {}).get(key)


def _pretrain_val(key: str) -> Callable[[Record], Any]:
    return lambda r: (r.results("pretrain").get("val") or {}).get(key)


# Top-k mass is 1 - tail mass exactly: the same correlation with its sign flipped, so it is
# not a pair of its own (it would only double-count in the adjustment).
PREDICTORS = (
    Predictor("base entropy", _diagnostic("entropy")),
    Predictor("base NLL", _diagnostic("nll")),
    Predictor("base tail mass", _diagnostic("tail_mass")),
    Predictor("base forking share", _diagnostic("forking_share")),
    Predictor("base Avg@n", lambda r: _avg(r, "eval_base")[1], shares_samples=True),
    Predictor("base pass@k", lambda r: _pass(r, "eval_base")[1], shares_samples=True),
    Predictor("pretrain val NLL", _pretrain_val("nll")),
    Predictor("pretrain val entropy", _pretrain_val("entropy")),
)


def _summary(record: Record, stage: str) -> dict:
    summary = record.results(stage).get("summary")
    return summary if isinstance(summary, dict) else {}


def _avg(record: Record, stage: str, key: Optional[str] = None) -> tuple[Optional[str], Any]:
    summary = _summary(record, stage)
    key = key or next((k for k in summary if isinstance(k, str) and k.startswith("avg@")), None)
    return key, summary.get(key) if key else None


def _pass(record: Record, stage: str, key: Optional[str] = None) -> tuple[Optional[str], Any]:
    summary = _summary(record, stage)
    ks = [int(k[5:]) for k in summary if isinstance(k, str) and k.startswith("pass@") and k[5:].isdigit()]
    key = key or (f"pass@{max(ks)}" if ks else None)
    return key, summary.get(key) if key else None


def gains(record: Record) -> dict[str, tuple[str, float]]:
    """"Avg@n" and "pass@k" -> (the key used, after RL minus before); the key must exist in both evals."""
    out = {}
    for name, read in (("Avg@n", _avg), ("pass@k", _pass)):
        key, before = read(record, "eval_base")
        _, after = read(record, "eval_rl", key)
        if _number(before) and _number(after):
            out[name] = (key, after - before)
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Pair:
    predictor: Predictor
    gain: str  # "Avg@n" or "pass@k"
    points: list[tuple[str, float, float]]  # (setting, predictor value, gain) per lineage
    correlation: Correlation
    p_adjusted: float = math.nan

    @property
    def significant(self) -> str:
        if math.isnan(self.p_adjusted):
            return "n/a"
        return "yes" if self.p_adjusted < ALPHA else "no"


@dataclass
class Predictors:
    lineages: int  # records with an eval before and after RL
    gain_keys: dict[str, list[str]]  # "pass@k" -> the keys the lineages used ("pass@16")
    pairs: list[Pair]


def relate(records: Sequence[Record], labels: dict) -> Optional[Predictors]:
    """Every predictor against every gain over the complete lineages; None when no lineage has both evals."""
    lineages = [r for r in records if not r.missing and gains(r)]
    if not lineages:
        return None
    gain_keys: dict[str, list[str]] = {}
    pairs = []
    for gain in ("Avg@n", "pass@k"):
        gain_keys[gain] = sorted({gains(r)[gain][0] for r in lineages if gain in gains(r)})
        for predictor in PREDICTORS:
            points = [(labels[r.setting], float(predictor.read(r)), gains(r)[gain][1]) for r in lineages
                      if gain in gains(r) and _number(predictor.read(r))]
            if points:
                correlation = spearman([x for _, x, _ in points], [y for _, _, y in points])
                pairs.append(Pair(predictor, gain, points, correlation))
    for pair, adjusted in zip(pairs, benjamini_hochberg([p.correlation.p for p in pairs])):
        pair.p_adjusted = adjusted
    return Predictors(len(lineages), gain_keys, pairs)


def strength(rho: float) -> str:
    size = abs(rho)
    word = "weak" if size < 0.3 else "moderate" if size < 0.5 else "strong"
    return f"{word} {'positive' if rho > 0 else 'negative'}"


def verdict(result: Predictors, gain: str) -> str:
    """Which diagnostic predicts this gain best, and how strongly, in words (or that none does)."""
    candidates = [p for p in result.pairs if p.gain == gain and not math.isnan(p.correlation.rho)]
    if not candidates:
        return f"Gain in {gain}: no diagnostic can be related to it (fewer than 3 lineages, or no spread)."
    best = max(candidates, key=lambda p: abs(p.correlation.rho))
    if best.significant == "yes":
        text = f"Gain in {gain}: {best.predictor.name} predicts it best, {_describe(best)}."
    else:
        text = (f"Gain in {gain}: no diagnostic predicts it significantly at 0.05 after the Benjamini-Hochberg "
                f"adjustment; the strongest is {best.predictor.name}, {_describe(best)}.")
    if best.predictor.shares_samples:
        text += (f" {best.predictor.name} is measured on the same samples as the gain's starting point, so part of "
                 "that correlation is regression to the mean.")
        others = [p for p in candidates if not p.predictor.shares_samples]
        if others:
            other = max(others, key=lambda p: abs(p.correlation.rho))
            text += f" Of the held-out-text diagnostics, {other.predictor.name} is the strongest, {_describe(other)}."
    return text


def _describe(pair: Pair) -> str:
    c = pair.correlation
    interval = f", 95% CI {c.low:+.2f} to {c.high:+.2f}" if not math.isnan(c.low) else ""
    verdict_text = {"yes": "significant", "no": "not significant"}.get(pair.significant, "untestable")
    return (f"a {strength(c.rho)} rank correlation (Spearman rho = {c.rho:+.2f}{interval}, n = {c.n} lineages, "
            f"BH-adjusted p = {_p(pair.p_adjusted)}: {verdict_text} at 0.05)")


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else "<0.0001" if p < 1e-4 else f"{p:.4f}"
