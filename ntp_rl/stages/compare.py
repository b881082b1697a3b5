"""`ntp-rl compare <run dirs | sweep dirs | pipeline dirs>`: the study's tables, tests and figures.

Reads only the runs' local records (run.json, config.yaml, results.json, metrics.jsonl),
so no W&B server is needed. Runs are grouped by setting: what their command line
changed, minus the seed and the keys that only say where things are written, minus what
every compared setting shares. Plain runs are linked into lineages by their inputs (an rl
run to its init_from, an eval to its model), as `pipeline` lineages are.

Per setting and metric: the mean over seeds with its 95% interval; per other setting, the
difference to a baseline with its interval, a p-value and a yes/no verdict (ntp_rl.stats).
Across lineages: which pre-RL diagnostic predicts the RL gain (predictors.md). Runs that
are missing a stage, did not finish or cannot be read are listed, never averaged in.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

from ntp_rl.errors import DataError, UserError
from ntp_rl.study.figures import write_figures
from ntp_rl.study.hypotheses import judge, write_verdicts
from ntp_rl.study.hypotheses import load as load_hypotheses
from ntp_rl.study.predictors import relate
from ntp_rl.study.records import find_records
from ntp_rl.study.report import write_compare, write_predictors
from ntp_rl.study.table import build_study, compare_to_baseline, label_settings, summarize
from ntp_rl.study.wandb_log import WandbOptions, log_study

DEFAULT_BASELINE = "ce"
# Where compare writes when --out is not given: beside the runs' own outputs/<stage>/ folders,
# a fresh directory per call, so two comparisons never overwrite each other.
DEFAULT_OUT_ROOT = Path("outputs") / "compare"


def compare(paths: Sequence[str], out_dir: Optional[str] = None, baseline: Optional[str] = None,
            adjustment: str = "holm", wandb: Optional[WandbOptions] = None,
            hypotheses: Optional[str] = None) -> dict[str, Any]:
    """Tables, figures and (with `wandb`) a W&B run for the runs under `paths`.

    `baseline` None means the default ("ce" when a setting is called that, else the first
    setting); a baseline given explicitly must match a setting. `hypotheses` (a YAML file or
    a shipped name) adds verdicts.md: the pre-registered hypotheses judged on these tables.
    """
    prereg = load_hypotheses(hypotheses) if hypotheses else None
    if prereg is not None and prereg.baseline:
        if baseline is not None and baseline != prereg.baseline:
            raise UserError(f"compare: --baseline {baseline} is not the baseline {prereg.baseline} that "
                            f"{prereg.path} was written against")
        baseline = prereg.baseline
    records = find_records(paths)
    target = _output_dir(out_dir)
    complete = [r for r in records if not r.missing]
    incomplete = [r for r in records if r.missing]
    labels = label_settings(records)
    study = build_study(records, baseline or DEFAULT_BASELINE, explicit=baseline is not None)
    means = summarize(study)
    comparisons = compare_to_baseline(study, adjustment)
    table = write_compare(target, study, means, comparisons, incomplete, adjustment)
    predictors = relate(complete, labels)
    predictors_text = write_predictors(target, predictors) if predictors is not None else ""
    figures = write_figures(target, complete, labels, predictors)
    verdicts = ""
    if prereg is not None:
        verdicts = write_verdicts(target, prereg, study.baseline, judge(prereg, study, means, comparisons, predictors),
                                  adjustment)
    wandb_dir = None
    if wandb is not None:
        tables = {"compare": _csv_table(target / "compare.csv")}
        if predictors is not None:
            tables["predictors"] = _csv_table(target / "predictors.csv")
        if verdicts:
            tables["verdicts"] = _csv_table(target / "verdicts.csv")
        wandb_dir = log_study(target, wandb, complete, tables, figures,
                              {"paths": [str(p) for p in paths], "baseline": study.baseline, "adjustment": adjustment,
                               "settings": study.settings, "lineages": len(complete)})
    return {"out_dir": str(target), "table": table, "predictors": predictors_text, "verdicts": verdicts,
            "baseline": study.baseline,
            "means": means, "comparisons": comparisons, "figures": [str(f) for f in figures],
            "incomplete": [str(r.path) for r in incomplete], "wandb_dir": wandb_dir,
            "rows": _rows(study, means)}


def _output_dir(out_dir: Optional[str]) -> Path:
    """--out as given (created if need be), else a new outputs/compare/<time> claimed atomically."""
    if out_dir:
        target = Path(out_dir)
        if target.exists() and not target.is_dir():
            raise DataError(f"compare: --out {out_dir}: is a file, not a directory")
        target.mkdir(parents=True, exist_ok=True)
        return target
    DEFAULT_OUT_ROOT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", *(f"-{i}" for i in range(1, 1000))):
        target = DEFAULT_OUT_ROOT / f"{stamp}{suffix}"
        try:
            target.mkdir()
            return target
        except FileExistsError:
            continue
    raise DataError(f"compare: could not create a fresh directory under {DEFAULT_OUT_ROOT}; pass --out")


def _rows(study: Any, means: dict) -> list[dict[str, Any]]:
    """The means table as plain rows: setting, seeds, each column's mean (and `<column> ci` as (low, high))."""
    rows = []
    for setting in study.settings:
        row: dict[str, Any] = {"setting": setting, "seeds": len(study.runs[setting])}
        for column, m in means[setting].items():
            row[column] = m.mean
            row[f"{column} ci"] = (m.low, m.high)
        rows.append(row)
    return rows


def _csv_table(path: Path) -> tuple[list[str], list[list]]:
    """A CSV file as W&B table columns and rows, numbers as numbers (so W&B can plot them)."""
    import csv

    def typed(cell: str) -> Any:
        if cell == "":
            return None
        try:
            return float(cell)
        except ValueError:
            return cell

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [[typed(cell) for cell in row] for row in rows[1:]]


def main(argv: Sequence[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="ntp-rl compare", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or pipeline lineages")
    parser.add_argument("--out", help=f"where the tables and PNGs go (default: a new {DEFAULT_OUT_ROOT}/<time>/)")
    parser.add_argument("--baseline", help=f"the setting the others are tested against: its label, a part of it "
                                           f"(ce, loss=ce) or its loss name (default: {DEFAULT_BASELINE} if a setting "
                                           "is called that, else the first setting)")
    parser.add_argument("--adjust", choices=("holm", "bh", "none"), default="holm",
                        help="multiple-comparison adjustment over the settings within a metric (default: holm)")
    parser.add_argument("--hypotheses", help="pre-registered hypotheses to judge on the tables (a YAML file, or the "
                                             "name of a shipped one: rl_study); writes verdicts.md")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "disabled"), default="auto",
                        help="log the tables and figures as a W&B run (job_type=compare); auto = online when "
                             "logged in, else offline (default: auto)")
    parser.add_argument("--wandb-project", help="W&B project (default: the compared runs' project, else ntp-rl)")
    parser.add_argument("--wandb-group", help="W&B group (default: the compared runs' group when they share one, "
                                              "else 'compare')")
    args = parser.parse_args(list(argv))
    result = compare(args.paths, args.out, baseline=args.baseline, adjustment=args.adjust,
                     wandb=WandbOptions(mode=args.wandb, project=args.wandb_project, group=args.wandb_group),
                     hypotheses=args.hypotheses)
    print(result["table"], end="")
    if result["verdicts"]:
        print("\n" + result["verdicts"], end="")
    verdicts = [line for line in result["predictors"].splitlines() if line.startswith("- Gain in ")]
    if verdicts:
        print("\n## What predicts the RL gain (predictors.md)\n\n" + "\n".join(verdicts))
    names = ["compare.md", "compare.csv"] + (["predictors.md", "predictors.csv"] if result["predictors"] else []) \
        + (["verdicts.md", "verdicts.csv"] if result["verdicts"] else [])
    print(f"\nwritten to {result['out_dir']}: " + ", ".join(names + [Path(f).name for f in result["figures"]]))
