"""The study's figures: training curves by setting, pass@k before and after RL, predictor scatters."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from ntp_rl.stats import mean_ci
from ntp_rl.study.predictors import Predictors
from ntp_rl.study.records import Record
from ntp_rl.study.table import record_values

PASS_VARIANTS = {"base": "base", "rl": "after RL", "eval": "eval"}


def _curves(records: Sequence[Record], labels: dict, stage: str,
            keys: Sequence[str]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """key -> setting label -> step -> values over seeds."""
    curves: dict[str, dict[str, dict[int, list[float]]]] = {k: defaultdict(lambda: defaultdict(list)) for k in keys}
    for record in records:
        for row in record.metrics(stage):
            step = row.get("step")
            if not isinstance(step, int):
                continue
            for key in keys:
                if isinstance(row.get(key), (int, float)):
                    curves[key][labels[record.setting]][step].append(row[key])
    return curves


def write_figures(out_dir: Path, records: Sequence[Record], labels: dict,
                  predictors: Optional[Predictors]) -> list[Path]:
    from ntp_rl.plots import plot_curves

    written = []
    # Training-batch curves: logged every few steps, where held-out checks are far apart; the
    # table reports the final held-out values.
    pretrain = _curves(records, labels, "pretrain", ["train/entropy", "train/nll"])
    if any(pretrain[k] for k in pretrain):
        written.append(plot_curves(out_dir / "pretrain_curves.png", pretrain, "pre-training step",
                                   {"train/entropy": "entropy (nats/token)", "train/nll": "NLL (nats/token)"},
                                   "Pre-training by setting, on training batches", log_y=True))
    rl = _curves(records, labels, "rl", ["reward", "entropy", "completions/mean_length"])
    if any(rl[k] for k in rl):
        written.append(plot_curves(out_dir / "rl_curves.png", rl, "RL step",
                                   {"reward": "reward", "entropy": "policy entropy (nats/token)",
                                    "completions/mean_length": "response length (tokens)"}, "RL by setting"))
    passk = _pass_at_k(out_dir, records, labels)
    if passk is not None:
        written.append(passk)
    if predictors is not None:
        written += _predictor_figures(out_dir, predictors)
    return written


def _pass_at_k(out_dir: Path, records: Sequence[Record], labels: dict) -> Optional[Path]:
    """pass@k per setting before and after RL (the table's columns), with 95% intervals over seeds."""
    from ntp_rl.plots import plot_pass_at_k

    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for column, value in record_values(record).items():
            prefix, _, metric = column.partition(" ")
            if prefix in PASS_VARIANTS and metric.startswith("pass@") and metric[5:].isdigit():
                values[f"{labels[record.setting]} ({PASS_VARIANTS[prefix]})"][int(metric[5:])].append(value)
    if not values:
        return None
    variants = list(PASS_VARIANTS.values())
    order = sorted(values, key=lambda label: (label.rpartition(" (")[0], variants.index(label.rpartition(" (")[2][:-1])))
    summaries = {label: {k: mean_ci(v) for k, v in values[label].items()} for label in order}
    seeds = max(m.n for ks in summaries.values() for m in ks.values())
    note = "mean over seeds, bars = 95% CI of the mean" if seeds > 1 else "one seed per setting"
    return plot_pass_at_k(out_dir / "passk.png", {label: {k: m.mean for k, m in ks.items()}
                                                  for label, ks in summaries.items()},
                          f"pass@k before and after RL\n({note})",
                          intervals={label: {k: (m.low, m.high) for k, m in ks.items()}
                                     for label, ks in summaries.items()})


def _predictor_figures(out_dir: Path, result: Predictors) -> list[Path]:
    from ntp_rl.plots import plot_scatter_grid

    written = []
    for gain, name in (("Avg@n", "predictors_avg.png"), ("pass@k", "predictors_passk.png")):
        pairs = [p for p in result.pairs if p.gain == gain and not math.isnan(p.correlation.rho)]
        if not pairs:  # fewer than 3 lineages, or no spread: nothing to see
            continue
        key = "/".join(result.gain_keys.get(gain, [])) or gain
        panels = []
        for pair in pairs:
            c = pair.correlation
            interval = f" [{c.low:+.2f}, {c.high:+.2f}]" if not math.isnan(c.low) else ""
            rho = f"rho = {c.rho:+.2f}{interval}" if not math.isnan(c.rho) else "rho: n/a"
            panels.append((f"{pair.predictor.name}\n{rho}, n = {c.n}", pair.predictor.name, f"gain in {key}",
                           pair.points))
        written.append(plot_scatter_grid(out_dir / name, panels,
                                         f"What predicts RL's gain in {key}? One point per lineage "
                                         f"(Spearman rho, 95% CI)"))
    return written
