"""compare.md / compare.csv and predictors.md / predictors.csv: the study's tables as files."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from ntp_rl.stats import MeanCI
from ntp_rl.study.predictors import Predictors, verdict
from ntp_rl.study.records import Record
from ntp_rl.study.table import Comparison, Study

ADJUSTMENT_NAMES = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "none"}
CSV_FIELDS = ["setting", "metric", "seeds", "mean", "std", "ci_low", "ci_high", "baseline", "test", "diff",
              "diff_low", "diff_high", "p", "p_adjusted", "significant", "note"]


def write_compare(out_dir: Path, study: Study, means: dict[str, dict[str, MeanCI]], comparisons: Sequence[Comparison],
                  incomplete: Sequence[Record], adjustment: str) -> str:
    """compare.csv (one row per setting and metric, every number) and compare.md; returns the markdown."""
    against = {(c.setting, c.metric): c for c in comparisons}
    with open(out_dir / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for setting in study.settings:
            for metric, m in means[setting].items():
                row: dict[str, Any] = {"setting": setting, "metric": metric, "seeds": m.n, "mean": m.mean,
                                       "std": m.std, "ci_low": m.low, "ci_high": m.high, "baseline": study.baseline}
                c = against.get((setting, metric))
                if c is not None:
                    r = c.result
                    row |= {"test": r.test, "diff": r.diff, "diff_low": r.low, "diff_high": r.high, "p": r.p,
                            "p_adjusted": c.p_adjusted, "significant": c.significant, "note": r.note}
                writer.writerow({k: _csv(v) for k, v in row.items()})
    used = sum(len(runs) for runs in study.runs.values())
    header = [f"# ntp-rl compare: {used} finished run(s) or lineage(s) in {len(study.settings)} setting(s)"
              + (f", {len(incomplete)} left out (listed at the end)" if incomplete else ""), ""]
    text = "\n".join(header + _means_table(study, means) + _comparison_table(study, comparisons, adjustment)
                     + _incomplete(incomplete)) + "\n"
    (out_dir / "compare.md").write_text(text)
    return text


def _means_table(study: Study, means: dict[str, dict[str, MeanCI]]) -> list[str]:
    if not study.settings:
        return ["## Means over seeds", "", "No finished run or lineage to compare (see below)."]
    lines = ["## Means over seeds", "",
             "± is the half-width of the 95% Student-t confidence interval of the mean (mean ± t·s/√n over the "
             "seeds), not the standard deviation; a single seed shows its value alone.", "",
             "| setting | seeds | " + " | ".join(study.columns) + " |", "|---|---|" + "---|" * len(study.columns)]
    for setting in study.settings:
        cells = []
        for column in study.columns:
            m = means[setting].get(column)
            cells.append("-" if m is None else f"{m.mean:.4f}" if m.n < 2 else f"{m.mean:.4f} ± {m.half_width:.4f}")
        lines.append(f"| {setting} | {len(study.runs[setting])} | " + " | ".join(cells) + " |")
    return lines


def _comparison_table(study: Study, comparisons: Sequence[Comparison], adjustment: str) -> list[str]:
    if len(study.settings) < 2:
        return []
    name = ADJUSTMENT_NAMES[adjustment]
    lines = ["", f"## Against the baseline: {study.baseline}", ""]
    if study.baseline_note:
        lines += [f"({study.baseline_note}; choose one with --baseline.)", ""]
    lines += ["Difference = setting − baseline, with its 95% confidence interval. Paired t-test by seed where both "
              "settings ran the same seeds, Welch's t-test otherwise; p adjusted "
              + (f"with {name} over the settings compared within each metric" if adjustment != "none" else "not at all")
              + "; significant = adjusted p < 0.05. The interval is not adjusted.", "",
              f"| metric | setting | test | seeds | difference [95% CI] | p | p ({name}) | significant at 0.05 |",
              "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        r = c.result
        interval = f" [{r.low:+.4f}, {r.high:+.4f}]" if not math.isnan(r.low) else ""
        seeds = f"{r.n} pairs" if r.test == "paired t" else f"{r.n} vs {r.n_baseline}"
        significant = c.significant if not r.note else f"n/a: {r.note}"
        lines.append(f"| {c.metric} | {c.setting} | {r.test or '-'} | {seeds} | {r.diff:+.4f}{interval} | {format_p(r.p)} | "
                     f"{format_p(c.p_adjusted)} | {significant} |")
    return lines


def _incomplete(incomplete: Sequence[Record]) -> list[str]:
    if not incomplete:
        return []
    return ["", "## Not included (missing, unfinished or unreadable)", ""] + [
        f"- {r.path}: {'; '.join(r.missing)}" for r in incomplete]


def write_predictors(out_dir: Path, result: Predictors) -> str:
    """predictors.csv and predictors.md (the table, then the verdict in words); returns the markdown."""
    with open(out_dir / "predictors.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["predictor", "gain", "n", "rho", "ci_low", "ci_high", "p", "p_bh", "significant"])
        for pair in result.pairs:
            c = pair.correlation
            writer.writerow([pair.predictor.name, pair.gain, c.n, *(_csv(v) for v in (c.rho, c.low, c.high, c.p,
                                                                                     pair.p_adjusted)),
                             pair.significant])
    keys = {gain: "/".join(keys) for gain, keys in result.gain_keys.items()}
    lines = ["# What predicts the RL gain", "",
             f"{result.lineages} lineages with an eval before and after RL. Gain = after RL − before, in "
             + " and ".join(f"{gain} ({key})" for gain, key in keys.items() if key) + ". Spearman's rank correlation "
             "over all lineages; 95% interval by Fisher's z with the Bonett-Wright variance; p from a permutation "
             "test, adjusted with Benjamini-Hochberg over every pair in the table; significant = adjusted p < 0.05.",
             "", *[f"- {verdict(result, gain)}" for gain in ("Avg@n", "pass@k")], "",
             "| predictor | gain in | n | Spearman rho [95% CI] | p | p (BH) | significant at 0.05 |",
             "|---|---|---|---|---|---|---|"]
    for pair in result.pairs:
        c = pair.correlation
        rho = "n/a" if math.isnan(c.rho) else f"{c.rho:+.3f}" + (
            f" [{c.low:+.2f}, {c.high:+.2f}]" if not math.isnan(c.low) else "")
        mark = " †" if pair.predictor.shares_samples else ""
        lines.append(f"| {pair.predictor.name}{mark} | {keys.get(pair.gain) or pair.gain} | {c.n} | {rho} | "
                     f"{format_p(c.p)} | {format_p(pair.p_adjusted)} | {pair.significant} |")
    lines += ["", "Reading it: † marks a predictor measured on the same sampled answers as the gain's 'before' term; "
              "noise in that measurement enters the gain with the opposite sign, so its correlation with the gain is "
              "pushed negative (regression to the mean) even when nothing real links them. The correlation runs "
              "across lineages of all settings, so it mixes differences between settings with seed-to-seed noise "
              "within them; it says what goes with a larger gain, not what causes it. Top-k mass is 1 − tail mass: "
              "its correlation is the tail mass's with the sign flipped. Figures: predictors_avg.png, "
              "predictors_passk.png."]
    text = "\n".join(lines) + "\n"
    (out_dir / "predictors.md").write_text(text)
    return text


def format_p(p: float) -> str:
    return "-" if math.isnan(p) else "<0.0001" if p < 1e-4 else f"{p:.4f}"


def _csv(value: Any) -> Any:
    return "" if isinstance(value, float) and math.isnan(value) else value
