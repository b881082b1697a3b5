"""Runs on disk -> records: one per pipeline lineage, or per chain of plain runs linked by their inputs.

A pipeline lineage (pretrain -> eval_base -> rl -> eval_rl) is one record. Plain runs are
linked the same way: an rl run to the run its `init_from` names, an eval run to the run
its model came from, so `ntp-rl compare outputs/rl outputs/pretrain` puts a pre-training
run and the RL run started from it on one row. A record with a stage that did not finish,
or whose files cannot be read (a failed run, an older version of the tool), is kept with
a note of what is missing: it is listed under the table, never averaged in.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ntp_rl.config.pipeline_schema import LINEAGE_STAGES
from ntp_rl.errors import DataError
from ntp_rl.rundir import CONFIG_FILE, RESULTS_FILE, RUN_FILE, read_run_info, setting_overrides
from ntp_rl.tracking import read_metrics

# Keys that name a run's input model rather than a setting: a linked run's parent says it.
INPUT_KEYS = {"rl": {"init_from"}, "eval": {"model", "model.name_or_path"}}


@dataclass
class Record:
    """One lineage (or one run standing alone) as compare sees it."""

    path: Path  # the lineage directory, or the last run of a chain
    kind: str  # "pipeline", "linked" (plain runs joined by their inputs) or a stage name
    setting: tuple[str, ...]  # the overrides that define its setting (seed excluded)
    seed: Optional[int]
    stages: dict[str, Path] = field(default_factory=dict)  # lineage stage -> its run directory
    missing: list[str] = field(default_factory=list)  # "rl: failed", "eval_rl: not run", ...
    _cache: dict = field(default_factory=dict, repr=False)

    def results(self, stage: str) -> dict:
        """The stage's results.json ({} when the stage is absent)."""
        if stage not in self.stages:
            return {}
        key = ("results", stage)
        if key not in self._cache:
            self._cache[key] = read_json(self.stages[stage] / RESULTS_FILE) or {}
        return self._cache[key]

    def metrics(self, stage: str) -> list[dict]:
        """The stage's metrics.jsonl rows, read once (a malformed line is warned about once)."""
        if stage not in self.stages:
            return []
        key = ("metrics", stage)
        if key not in self._cache:
            self._cache[key] = read_metrics(self.stages[stage])
        return self._cache[key]

    def config(self, stage: str) -> dict:
        """The stage's config.yaml as a plain dict ({} when absent or unreadable)."""
        key = ("config", stage)
        if key not in self._cache:
            self._cache[key] = read_config(self.stages[stage]) if stage in self.stages else {}
        return self._cache[key]


def read_json(path: Path) -> Optional[dict]:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_config(run_dir: Path) -> dict:
    """config.yaml as a dict; an unreadable or foreign file reads as {}, never an exception."""
    import yaml

    try:
        value = yaml.safe_load((Path(run_dir) / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def find_records(paths: Sequence[str]) -> list[Record]:
    """Every run under the given paths, as records; a lineage's stage runs belong to the lineage."""
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
    lineages = [p for p in run_dirs if _is_lineage(p)]
    plain = [p for p in run_dirs if p not in lineages and not any(lineage in p.parents for lineage in lineages)]
    return [lineage_record(p) for p in lineages] + link_plain_runs(plain)


def _is_lineage(path: Path) -> bool:
    """A pipeline's directory, also when its own run.json is unreadable: it holds the stages' runs."""
    stage = read_run_info(path).get("stage")
    return stage == "pipeline" or (stage is None and any((path / s / RUN_FILE).exists() for s in LINEAGE_STAGES))


def lineage_record(path: Path) -> Record:
    info = read_run_info(path)
    record = Record(path=path, kind="pipeline", setting=_setting(info.get("overrides"), "pipeline", linked=False),
                    seed=_seed(path))
    if info.get("stage") != "pipeline":
        record.missing.append(f"lineage: {RUN_FILE} missing or unreadable, so its setting is unknown")
    for stage in LINEAGE_STAGES:
        if stage == "midtrain" and not (path / stage).exists():  # a stage a lineage may go without
            continue
        _attach(record, stage, path / stage, absent="not run")
    return record


def _attach(record: Record, stage: str, run_dir: Path, absent: str) -> None:
    """Add a stage's run to the record, or note why it cannot count."""
    info = read_run_info(run_dir)
    status = info.get("status") if info else (absent if not (run_dir / RUN_FILE).exists() else "unreadable run.json")
    if status != "finished":
        record.missing.append(f"{stage}: {status or 'no status (older format?)'}")
    elif read_json(run_dir / RESULTS_FILE) is None:
        record.missing.append(f"{stage}: finished, but {RESULTS_FILE} is missing or unreadable")
    else:
        record.stages[stage] = run_dir


def link_plain_runs(run_dirs: Sequence[Path]) -> list[Record]:
    """Chains of plain runs: pretrain -> (eval of it) -> rl from it -> (eval of that rl run).

    Each rl run makes one chain; a pre-training run without an rl run makes its own (with
    its eval, if any); an eval of neither stands alone. When a model has several evals, the
    newest finished one is linked and the others stand alone.
    """
    infos = {p: read_run_info(p) for p in run_dirs}
    stage_of = {p: infos[p].get("stage", "?") for p in run_dirs}
    parent = {p: input_run(p, stage_of[p], run_dirs) for p in run_dirs if stage_of[p] in INPUT_KEYS}
    evals_of: dict[Path, list[Path]] = {}
    for p in sorted(run_dirs, key=lambda q: (infos[q].get("status") == "finished", q.name), reverse=True):
        if stage_of[p] == "eval" and parent.get(p) is not None:
            evals_of.setdefault(parent[p], []).append(p)
    used: set[Path] = set()
    records = []
    for rl in (p for p in run_dirs if stage_of[p] == "rl"):
        chain = {"rl": rl}
        source = parent.get(rl)
        if source is not None and read_run_info(source).get("stage") == "pretrain":
            chain["pretrain"] = source
        for stage, model in (("eval_base", chain.get("pretrain")), ("eval_rl", rl)):
            if model is not None and evals_of.get(model):
                chain[stage] = evals_of[model][0]
        records.append(_chain_record(chain, parent))
        used.update(chain.values())
    for pretrain in (p for p in run_dirs if stage_of[p] == "pretrain" and p not in used):
        chain = {"pretrain": pretrain}
        if evals_of.get(pretrain):
            chain["eval_base"] = evals_of[pretrain][0]
        records.append(_chain_record(chain, parent))
        used.update(chain.values())
    for p in run_dirs:
        if p not in used:
            records.append(_chain_record({stage_of[p]: p}, parent))
    return records


def _chain_record(chain: dict[str, Path], parent: dict[Path, Optional[Path]]) -> Record:
    ordered = {stage: chain[stage] for stage in (*LINEAGE_STAGES, *chain) if stage in chain}
    setting: list[str] = []
    for stage, run_dir in ordered.items():
        linked = parent.get(run_dir) in chain.values()
        for override in _setting(read_run_info(run_dir).get("overrides"), read_run_info(run_dir).get("stage"), linked):
            if override not in setting:
                setting.append(override)
    root = next(iter(ordered.values()))
    kind = "linked" if len(ordered) > 1 else next(iter(ordered))
    record = Record(path=list(ordered.values())[-1], kind=kind, setting=tuple(setting), seed=_seed(root))
    for stage, run_dir in ordered.items():
        _attach(record, stage, run_dir, absent="not run")
    return record


def input_run(run_dir: Path, stage: str, known: Sequence[Path]) -> Optional[Path]:
    """The run directory an rl run started from, or an eval run evaluated; None for a hub model.

    results.json holds the resolved model directory, config.yaml the argument as typed;
    either may be relative to the directory the run was started in, so a path that does not
    exist from here is matched by its trailing components against the runs being compared.
    """
    results = read_json(run_dir / RESULTS_FILE) or {}
    config = read_config(run_dir)
    if stage == "rl":
        candidates = [results.get("init_from"), config.get("init_from")]
    else:
        candidates = [results.get("model"), (config.get("model") or {}).get("name_or_path")
                      if isinstance(config.get("model"), dict) else None]
    for candidate in candidates:
        if isinstance(candidate, str) and candidate:
            found = _run_dir_of(Path(candidate), known)
            if found is not None and found != run_dir:
                return found
    return None


def _run_dir_of(model_path: Path, known: Sequence[Path]) -> Optional[Path]:
    # <run>/checkpoints/step_N, <run>/checkpoints or <run>: the nearest directory with a run.json.
    for path in [model_path, *model_path.parents][:3]:
        if path.parts and (path / RUN_FILE).is_file():  # never "." (a hub name's parent)
            return path.resolve()
    # Not here (relative to another directory, or moved): the run being compared whose path
    # ends the same way, trying the longest ending first; two equally good matches are none.
    tail = _strip_checkpoint(model_path).parts
    for length in range(len(tail), 0, -1):
        matches = [p for p in known if p.parts[-length:] == tail[-length:]]
        if matches:
            return matches[0] if len(matches) == 1 else None
    return None


def _strip_checkpoint(path: Path) -> Path:
    parts = list(path.parts)
    if parts and re.fullmatch(r"step_\d+", parts[-1]):
        parts.pop()
    if parts and parts[-1] == "checkpoints":
        parts.pop()
    return Path(*parts) if parts else Path()


def _setting(overrides: Any, stage: Optional[str], linked: bool) -> tuple[str, ...]:
    """The overrides that make a setting: no seed, no bookkeeping; an input model is its run's
    name (or dropped when the record links that run), never a whole path."""
    if not isinstance(overrides, list):
        return ()
    kept = []
    for override in (str(o) for o in overrides):
        key, _, value = override.partition("=")
        key, value = key.lstrip("+~"), value.strip("'\"")  # a quoted path is still a path
        if key == "seed" or not setting_overrides([override]):
            continue
        if key in INPUT_KEYS.get(stage or "", set()):
            if linked or (key == "model" and value == "hf"):
                continue
            override = f"{key}={_short_model(value)}"
        kept += setting_overrides([override])  # as in run names and W&B tags (64 characters)
    return tuple(kept)


def _short_model(value: str) -> str:
    """A run directory or checkpoint path -> the run's directory name; a hub name stays as it is."""
    path = Path(value)
    if not (value.startswith((".", "/", "~")) or path.exists() or "checkpoints" in path.parts):
        return value  # org/name on the hub
    return _strip_checkpoint(path).name or value


def _seed(run_dir: Path) -> Optional[int]:
    value = read_config(run_dir).get("seed")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value)
