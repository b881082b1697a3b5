"""The study's table: per setting, each metric's mean over seeds with its 95% interval, and each
setting against a baseline with the difference, its interval, a p-value and a verdict.

Settings are compared one metric at a time. Within a metric the comparisons against the
baseline form one family, adjusted with Holm's method by default (docs/studies.md says why);
metrics are separate questions and are not adjusted against each other.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

from ntp_rl.errors import UserError
from ntp_rl.stats import ADJUSTMENTS, ALPHA, Difference, MeanCI, difference, mean_ci
from ntp_rl.study.predictors import gains
from ntp_rl.study.records import Record

SAMPLED = ("avg@", "cons@", "pass@")
SUITE_COLUMN = re.compile(r"^\S+ (\S+) ((?:avg|cons|pass)@\d+|mean_length)$")
FILLED_GROUPS = "dynamic_sampling/filled_groups"


def label_settings(records: Sequence[Record]) -> dict[tuple[str, ...], str]:
    """Short labels: the overrides that tell the settings apart; one setting keeps all of its own."""
    settings = {r.setting for r in records}
    shared = set.intersection(*(set(s) for s in settings)) if len(settings) > 1 else set()
    return {s: ",".join(o for o in s if o not in shared) or "default" for s in settings}


def record_values(record: Record) -> dict[str, float]:
    """The table's numbers for one record (a key is absent when its stage or metric is)."""
    values: dict[str, Any] = {}
    for stage in ("pretrain", "midtrain"):  # a lineage's midtrain stage is what its base model is
        val = record.results(stage).get("val") or {}
        values |= {f"{stage} {key}": val.get(key) for key in ("nll", "ppl", "entropy")}
        if _number(val.get("entropy")) and _number(val.get("nll")):
            # Over- or under-confidence: the loss's shape shows here even when runs stopped at
            # different NLLs, where raw entropy mostly tracks how far training got.
            values[f"{stage} entropy-nll"] = val["entropy"] - val["nll"]
    pretrain = record.results("pretrain")
    if "stopped_at" in pretrain:  # train.stop_at: the steps each prior needed to reach the accuracy are a result
        values["pretrain steps"] = pretrain.get("step")
    if "stopped_at" in record.results("rl"):  # rl.plateau: the steps each prior's RL took to level off are a result
        values["rl steps"] = record.results("rl").get("step")
    evals = (("eval_base", "base"), ("eval_rl", "rl"), ("eval", "eval"))
    if any(stage in record.stages for stage, _ in evals):
        for stage, prefix in evals:
            results = record.results(stage)
            values |= _sampled(results.get("summary"), prefix)  # a suite's: the mean over its benchmarks
            for name, summary in (results.get("benchmarks") or {}).items():
                values |= _sampled(summary, f"{prefix} {name}")
            diagnostics = results.get("diagnostics") or {}
            if _number(diagnostics.get("entropy")) and _number(diagnostics.get("nll")):
                # As "pretrain entropy-nll", on the held-out text at the task's difficulty (eval's diagnostics).
                values[f"{prefix} entropy-nll"] = diagnostics["entropy"] - diagnostics["nll"]
    else:  # an rl run without linked evals: its own held-out checks before and after training
        for when, prefix in (("eval_before", "base"), ("eval_after", "rl")):
            values |= _sampled(record.results("rl").get(when), prefix)
    for key, name in (("entropy", "rl entropy change"), ("completions/mean_length", "rl length change")):
        logged = [row[key] for row in record.metrics("rl") if _number(row.get(key))]
        if len(logged) >= 2:  # the policy's own, on its rollouts: last RL step minus the first
            values[name] = logged[-1] - logged[0]
    for key, gain in gains(record).values():  # RL's own effect, tested like any metric
        values[f"gain {key}"] = gain
    filled = [row[FILLED_GROUPS] for row in record.metrics("rl") if _number(row.get(FILLED_GROUPS))]
    if filled:  # generic: the mean over steps of whatever the run logged
        values["rl filled groups/step"] = sum(filled) / len(filled)
    return {key: float(value) for key, value in values.items() if _number(value)}


def _sampled(summary: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(summary, dict):
        return {}
    return {f"{prefix} {key}": value for key, value in summary.items()
            if isinstance(key, str) and (key.startswith(SAMPLED) or key == "mean_length")}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def column_order(columns: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple:
        group = next((i for i, p in enumerate(("pretrain", "midtrain", "base", "eval", "rl", "gain")) if name.startswith(p)), 9)
        metric = name.split(" ", 1)[1] if " " in name else name
        benchmark = SUITE_COLUMN.match(name)  # "base aime24 avg@128": after the means, by benchmark, then metric
        if benchmark:
            metric = benchmark.group(2)
        kind = next((i for i, p in enumerate(("nll", "ppl", "entropy", "avg@", "cons@", "pass@", "mean_length"))
                     if metric.startswith(p)), 9)
        k = int(metric.split("@")[1]) if "@" in metric and metric.split("@")[1].isdigit() else 0
        return group, benchmark.group(1) if benchmark else "", kind, k, name

    return sorted(set(columns), key=key)


@dataclass
class Study:
    """Complete records grouped by setting, and the baseline the others are compared with."""

    runs: dict[str, list[tuple[Optional[int], dict[str, float]]]]  # setting -> (seed, values) per record
    columns: list[str]
    baseline: Optional[str]
    baseline_note: str = ""
    settings: list[str] = field(default_factory=list)  # the baseline first, then the others sorted


def build_study(records: Sequence[Record], baseline: Optional[str], explicit: bool) -> Study:
    labels = label_settings(records)
    complete = [r for r in records if not r.missing]
    runs: dict[str, list] = defaultdict(list)
    for record in complete:
        runs[labels[record.setting]].append((record.seed, record_values(record)))
    columns = column_order(c for rows in runs.values() for _, values in rows for c in values)
    chosen, note = choose_baseline(sorted(runs), complete, labels, baseline, explicit)
    settings = ([chosen] if chosen else []) + sorted(s for s in runs if s != chosen)
    return Study(dict(runs), columns, chosen, note, settings)


def choose_baseline(settings: Sequence[str], records: Sequence[Record], labels: dict, requested: Optional[str],
                    explicit: bool) -> tuple[Optional[str], str]:
    """The setting called `requested`: its label, a part of its label (`ce` or `loss=ce`), or the
    loss name in its pre-training results. Unmatched: an explicit request is an error, the
    default falls back to the first setting."""
    if not settings:
        return None, ""
    if requested:
        loss_names: dict[str, set] = defaultdict(set)
        for record in records:
            loss_names[labels[record.setting]].add((record.results("pretrain").get("loss") or {}).get("name"))
        tests = [lambda s: s == requested, lambda s: label_matches(s, requested), lambda s: loss_names[s] == {requested}]
        for test in tests:
            matches = [s for s in settings if test(s)]
            if len(matches) == 1:
                return matches[0], ""
            if len(matches) > 1 and explicit:
                raise UserError(f"compare: --baseline {requested} matches several settings ({', '.join(matches)}); "
                                "pass one of them whole")
        if explicit:
            raise UserError(f"compare: --baseline {requested} matches no setting; the settings are: "
                            f"{', '.join(settings)}")
        return settings[0], f"no setting is '{requested}', so the first one is the baseline"
    return settings[0], ""


def label_matches(setting: str, name: str) -> bool:
    """A setting named as a user would: its whole label, one of its overrides (loss=ce) or that override's value (ce)."""
    return setting == name or any(part == name or part.partition("=")[2] == name for part in setting.split(","))


def summarize(study: Study) -> dict[str, dict[str, MeanCI]]:
    """setting -> column -> mean and 95% interval over its seeds."""
    return {s: {c: mean_ci([v[c] for _, v in study.runs[s] if c in v]) for c in study.columns
                if any(c in v for _, v in study.runs[s])} for s in study.settings}


@dataclass
class Comparison:
    metric: str
    setting: str
    result: Difference
    p_adjusted: float = math.nan

    @property
    def significant(self) -> str:
        if math.isnan(self.p_adjusted):
            return "n/a"
        return "yes" if self.p_adjusted < ALPHA else "no"


def compare_to_baseline(study: Study, adjustment: str) -> list[Comparison]:
    """Every other setting against the baseline, per metric; p adjusted within each metric."""
    comparisons = []
    for metric in study.columns:
        base = [(seed, v[metric]) for seed, v in study.runs.get(study.baseline, []) if metric in v]
        family = []
        for setting in study.settings[1:]:
            values = [(seed, v[metric]) for seed, v in study.runs[setting] if metric in v]
            if values and base:
                family.append(Comparison(metric, setting, difference(values, base)))
        for comparison, adjusted in zip(family, ADJUSTMENTS[adjustment]([c.result.p for c in family])):
            comparison.p_adjusted = adjusted
        comparisons += family
    return comparisons
