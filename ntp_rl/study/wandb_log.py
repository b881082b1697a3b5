"""`compare`'s own W&B run: its tables and figures, job_type=compare, in the study's group.

The lineages' runs log through Accelerate's tracker; compare has no accelerator and no
training loop, so it calls wandb directly. The mode follows the other stages (`auto` =
online when logged in, offline otherwise, WANDB_MODE wins over auto); offline runs are
written under the output directory and can be uploaded later with `wandb sync`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ntp_rl.config.schema import WandbMode
from ntp_rl.errors import UserError, first_line
from ntp_rl.study.records import Record
from ntp_rl.tracking import resolve_wandb

DEFAULT_PROJECT = "ntp-rl"
DEFAULT_GROUP = "compare"


@dataclass
class WandbOptions:
    mode: str = "auto"  # auto | online | offline | disabled
    project: Optional[str] = None  # None: the compared runs' project when they agree, else ntp-rl
    entity: Optional[str] = None  # None: the compared runs' entity when they agree
    group: Optional[str] = None  # None: the compared runs' group when they agree, else "compare"


def log_study(out_dir: Path, options: WandbOptions, records: Sequence[Record],
              tables: dict[str, tuple[list[str], list[list]]], images: Sequence[Path], config: dict) -> Optional[str]:
    """Log the tables (name -> (columns, rows)) and PNGs as one run; returns the run's directory, or None if disabled."""
    mode, offline_because = resolve_wandb(WandbMode(options.mode))
    if mode == "disabled":
        return None
    import wandb

    group = options.group or _common(records, "group") or DEFAULT_GROUP
    if mode == "offline":
        why = offline_because or "not logged in, or --wandb offline"
        print(f"W&B: offline ({why}), run files in {out_dir / 'wandb'} "
              f"(upload later with `wandb sync {out_dir / 'wandb'}/offline-run-*`)", file=sys.stderr)
    try:
        run = wandb.init(project=options.project or _common(records, "project") or DEFAULT_PROJECT,
                         entity=options.entity or _common(records, "entity"), group=group, job_type="compare",
                         name=f"compare-{group}", dir=str(out_dir), mode=mode, config=config,
                         settings={"console": "off", "quiet": True, "silent": True})
    except Exception as exc:  # a server or login problem; the files are already written
        raise UserError(f"compare: W&B ({mode}): {first_line(exc)}; the tables and figures are in {out_dir} "
                        "(rerun with --wandb offline to keep a local W&B run)") from exc
    try:
        payload: dict[str, Any] = {f"compare/{name}": wandb.Table(columns=list(columns), data=[list(r) for r in rows])
                                   for name, (columns, rows) in tables.items()}
        payload |= {f"compare/{Path(image).stem}": wandb.Image(str(image)) for image in images}
        run.log(payload)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()
    if wandb.run is None:
        # wandb-core writes the run file after finish() returns; shutting its service down waits
        # for that, so the offline files are complete (ready for `wandb sync`) when compare returns.
        wandb.teardown()
    return str(Path(run.dir).parent)


def _common(records: Sequence[Record], key: str) -> Optional[str]:
    """logger.wandb.<key> when every compared record's runs agree on one value, else None."""
    values = set()
    for record in records:
        for stage in record.stages:
            wandb_cfg = ((record.config(stage).get("logger") or {}).get("wandb") or {})
            values.add(wandb_cfg.get(key) if isinstance(wandb_cfg, dict) else None)
    values.discard(None)
    return next(iter(values)) if len(values) == 1 and _all_set(records, key) else None


def _all_set(records: Sequence[Record], key: str) -> bool:
    return all(((record.config(stage).get("logger") or {}).get("wandb") or {}).get(key) is not None
               for record in records for stage in record.stages)
