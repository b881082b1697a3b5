"""`ntp-rl compare <run dirs | sweep dirs | pipeline dirs>`: the study's table and figures.

Reads only the runs' local records (run.json, config.yaml, results.json, metrics.jsonl),
so no W&B server is needed. Runs are grouped by setting: what their command line
changed, minus the seed and the keys that only say where things are written, minus what
every compared run shares. A setting's numbers are the mean (and spread) over its seeds.

A pipeline lineage (pretrain -> eval_base -> rl -> eval_rl) contributes all four stages;
a single pretrain, rl or eval run contributes its own columns. Runs that are missing a
stage or did not finish are listed, not averaged in, and never stop the comparison.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ntp_rl.errors import DataError
from ntp_rl.rundir import RESULTS_FILE, RUN_FILE, read_run_info, setting_overrides
from ntp_rl.tracking import read_metrics

# A pipeline lineage's stage directories, in order.
LINEAGE_STAGES = ("pretrain", "eval_base", "rl", "eval_rl")


@dataclass
class Record:
    """One run (or one lineage) as compare sees it."""

    path: Path
    kind: str  # "pipeline" or a stage name
    setting: tuple[str, ...]  # the overrides that define its setting (seed excluded)
    seed: Optional[int]
    stages: dict[str, Path] = field(default_factory=dict)  # stage -> its run directory
    missing: list[str] = field(default_factory=list)  # "rl: failed", "eval_rl: not run", ...


def find_records(paths: Sequence[str]) -> list[Record]:
    """Every run under the given paths; a lineage's stage runs belong to the lineage."""
    run_dirs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"compare: {raw}: no such directory")
        found = [p.parent for p in path.rglob(RUN_FILE)] if path.is_dir() else []
        if not found:
            raise DataError(f"compare: {raw}: no ntp-rl runs there (no {RUN_FILE} below it)")
        run_dirs += found
    run_dirs = sorted(set(p.resolve() for p in run_dirs))
    lineages = [p for p in run_dirs if read_run_info(p).get("stage") == "pipeline"]
    records = [_lineage_record(p) for p in lineages]
    for path in run_dirs:
        if path in lineages or any(lineage in path.parents for lineage in lineages):
            continue
        info = read_run_info(path)
        record = Record(path=path, kind=info.get("stage", "?"), setting=_setting(info), seed=_seed(path))
        if info.get("status") == "finished":
            record.stages[record.kind] = path
        else:
            record.missing.append(f"{record.kind}: {info.get('status', 'unknown')}")
        records.append(record)
    return records


def _lineage_record(path: Path) -> Record:
    info = read_run_info(path)
    record = Record(path=path, kind="pipeline", setting=_setting(info), seed=_seed(path))
    for stage in LINEAGE_STAGES:
        stage_info = read_run_info(path / stage)
        if stage_info.get("status") == "finished":
            record.stages[stage] = path / stage
        else:
            record.missing.append(f"{stage}: {stage_info.get('status', 'not run')}")
    return record


def _setting(info: dict) -> tuple[str, ...]:
    return tuple(o for o in setting_overrides(info.get("overrides", [])) if o.split("=", 1)[0] != "seed")


def _seed(path: Path) -> Optional[int]:
    from omegaconf import OmegaConf

    try:
        return int(OmegaConf.load(path / "config.yaml").seed)
    except (OSError, ValueError, AttributeError):
        return None


def label_settings(records: Sequence[Record]) -> dict[tuple[str, ...], str]:
    """Short labels: the overrides that tell the settings apart ("default" when none do)."""
    settings = {r.setting for r in records}
    shared = set.intersection(*(set(s) for s in settings)) if settings else set()
    return {s: ",".join(o for o in s if o not in shared) or "default" for s in settings}


def _results(path: Path) -> dict:
    try:
        return json.loads((path / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def record_values(record: Record) -> dict[str, float]:
    """The table's numbers for one run or lineage (keys absent when the stage is missing)."""
    values: dict[str, float] = {}
    if "pretrain" in record.stages:
        val = _results(record.stages["pretrain"]).get("val", {})
        for key in ("nll", "ppl", "entropy"):
            if key in val:
                values[f"pretrain {key}"] = val[key]
    for stage, prefix in (("eval_base", "base"), ("eval_rl", "rl"), ("eval", "eval")):
        summary = _results(record.stages[stage]).get("summary", {}) if stage in record.stages else {}
        for key, value in summary.items():
            if key.startswith(("avg@", "cons@", "pass@")) or key == "mean_length":
                values[f"{prefix} {key}"] = value
    if record.kind == "rl":  # a lone rl run: its own held-out checks before and after training
        results = _results(record.stages["rl"]) if "rl" in record.stages else {}
        for when, prefix in (("eval_before", "base"), ("eval_after", "rl")):
            for key, value in (results.get(when) or {}).items():
                if key.startswith(("avg@", "cons@", "pass@")) or key == "mean_length":
                    values[f"{prefix} {key}"] = value
    return values


def _column_order(columns: Iterable[str]) -> list[str]:
    def key(name: str) -> tuple:
        group = next((i for i, p in enumerate(("pretrain", "base", "eval", "rl")) if name.startswith(p)), 9)
        metric = name.split(" ", 1)[1]
        kind = next((i for i, p in enumerate(("nll", "ppl", "entropy", "avg@", "cons@", "pass@", "mean_length"))
                     if metric.startswith(p)), 9)
        k = int(metric.split("@")[1]) if "@" in metric and metric.split("@")[1].isdigit() else 0
        return group, kind, k, name

    return sorted(set(columns), key=key)


def aggregate(records: Sequence[Record]) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows per setting: mean, spread and seed count of each column over the complete records."""
    labels = label_settings(records)
    by_setting: dict[str, list[dict[str, float]]] = defaultdict(list)
    for record in records:
        if not record.missing:
            by_setting[labels[record.setting]].append(record_values(record))
    columns = _column_order(c for rows in by_setting.values() for r in rows for c in r)
    rows = []
    for setting in sorted(by_setting):
        runs = by_setting[setting]
        row: dict[str, Any] = {"setting": setting, "seeds": len(runs)}
        for column in columns:
            values = [r[column] for r in runs if column in r]
            if values:
                row[column] = statistics.fmean(values)
                row[f"{column} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return columns, rows


def write_table(out_dir: Path, columns: list[str], rows: list[dict[str, Any]], incomplete: list[Record]) -> str:
    with open(out_dir / "compare.csv", "w", newline="") as f:
        names = ["setting", "seeds"] + [c for col in columns for c in (col, f"{col} std")]
        writer = csv.DictWriter(f, fieldnames=names, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| setting | seeds | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            if column not in row:
                cells.append("-")
            elif row["seeds"] > 1:
                cells.append(f"{row[column]:.4f} ± {row[f'{column} std']:.4f}")
            else:
                cells.append(f"{row[column]:.4f}")
        lines.append(f"| {row['setting']} | {row['seeds']} | " + " | ".join(cells) + " |")
    if incomplete:
        lines += ["", "Not included (missing or unfinished):", ""]
        lines += [f"- {r.path}: {'; '.join(r.missing)}" for r in incomplete]
    text = "\n".join(lines) + "\n"
    (out_dir / "compare.md").write_text(text)
    return text


def _curves(records: Sequence[Record], stage: str, keys: Sequence[str]) -> dict[str, dict[str, dict[int, list[float]]]]:
    """key -> setting label -> step -> values over seeds."""
    labels = label_settings(records)
    curves: dict[str, dict[str, dict[int, list[float]]]] = {k: defaultdict(lambda: defaultdict(list)) for k in keys}
    for record in records:
        if stage not in record.stages:
            continue
        for row in read_metrics(record.stages[stage]):
            for key in keys:
                if row.get(key) is not None:
                    curves[key][labels[record.setting]][row["step"]].append(row[key])
    return curves


def write_figures(out_dir: Path, records: Sequence[Record]) -> list[Path]:
    from ntp_rl.plots import plot_curves, plot_pass_at_k

    written = []
    # Training-batch curves: logged every few steps, where held-out checks are far apart; the
    # table reports the final held-out values.
    pretrain = _curves(records, "pretrain", ["train/entropy", "train/nll"])
    if any(pretrain[k] for k in pretrain):
        written.append(plot_curves(out_dir / "pretrain_curves.png", pretrain, "pre-training step",
                                   {"train/entropy": "entropy (nats/token)", "train/nll": "NLL (nats/token)"},
                                   "Pre-training by setting, on training batches (mean over seeds, band = min..max)",
                                   log_y=True))
    rl = _curves(records, "rl", ["reward", "entropy", "completions/mean_length"])
    if any(rl[k] for k in rl):
        written.append(plot_curves(out_dir / "rl_curves.png", rl, "RL step",
                                   {"reward": "reward", "entropy": "policy entropy (nats/token)",
                                    "completions/mean_length": "response length (tokens)"},
                                   "RL by setting (mean over seeds, band = min..max)"))
    labels = label_settings(records)
    passk: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for stage, suffix in (("eval_base", "base"), ("eval_rl", "after RL"), ("eval", "eval")):
            if stage in record.stages:
                summary = _results(record.stages[stage]).get("summary", {})
                for key, value in summary.items():
                    if key.startswith("pass@"):
                        passk[f"{labels[record.setting]} ({suffix})"][int(key[5:])].append(value)
    if passk:
        means = {label: {k: statistics.fmean(v) for k, v in ks.items()} for label, ks in sorted(passk.items())}
        written.append(plot_pass_at_k(out_dir / "passk.png", means, "pass@k before and after RL (mean over seeds)"))
    return written


def compare(paths: Sequence[str], out_dir: Optional[str] = None) -> dict[str, Any]:
    records = find_records(paths)
    target = Path(out_dir) if out_dir else Path(paths[0]) / "compare"
    target.mkdir(parents=True, exist_ok=True)
    columns, rows = aggregate(records)
    incomplete = [r for r in records if r.missing]
    table = write_table(target, columns, rows, incomplete)
    figures = write_figures(target, [r for r in records if not r.missing])
    return {"out_dir": str(target), "table": table, "rows": rows, "figures": [str(f) for f in figures],
            "incomplete": [str(r.path) for r in incomplete]}


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ntp-rl compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or pipeline lineages")
    parser.add_argument("--out", help="where compare.md, compare.csv and the PNGs go (default: <first path>/compare)")
    args = parser.parse_args(list(argv))
    result = compare(args.paths, args.out)
    print(result["table"], end="")
    print(f"\nwritten to {result['out_dir']}: compare.md, compare.csv, " + ", ".join(Path(f).name for f in result["figures"]))
