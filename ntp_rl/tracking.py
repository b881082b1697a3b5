"""Metrics go to two places: W&B (through Accelerate's tracker) and the run's metrics.jsonl.

The local file is the record `ntp-rl compare` reads, so a run is fully described without
a W&B server. W&B mode `auto` logs online when the user is logged in and offline
otherwise (saying so once); `disabled` skips W&B entirely.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence
from urllib.parse import urlparse

from omegaconf import OmegaConf

from ntp_rl.config.schema import WandbMode
from ntp_rl.errors import ConfigError, first_line
from ntp_rl.io import write_atomic, writing

METRICS_FILE = "metrics.jsonl"


# How long the check that the W&B server answers may take: an unreachable one (a compute node without internet)
# costs this, not W&B's own 90 s wait and a traceback.
REACH_TIMEOUT_S = 5.0


def resolve_wandb(requested: WandbMode) -> tuple[str, str]:
    """The mode a run logs in, and why it logs offline when it would have logged online ("" otherwise).

    `auto` is online when logged in and the server answers, else offline (the Tracker says why, once); an
    explicit online (logger.wandb.mode, or WANDB_MODE, which wins over auto) without a login or a server that
    answers is refused in one line, before any run directory exists.
    """
    explicit = "logger.wandb.mode" if requested is not WandbMode.auto else None
    mode = requested.value
    env_mode = os.environ.get("WANDB_MODE")
    if explicit is None and env_mode in ("online", "offline", "disabled", "dryrun"):
        mode = "offline" if env_mode == "dryrun" else env_mode
        explicit = "WANDB_MODE" if mode == "online" else None
    elif explicit is None:
        mode = "online" if wandb_logged_in() else "offline"
    if mode != "online":
        return mode, ""
    problem = None if explicit is None else _login_problem()
    problem = problem or _reach_problem()
    if problem is None:
        return "online", ""
    if explicit:
        raise ConfigError(explicit, f"{problem}; use logger.wandb.mode=auto (or offline) to log offline and "
                          "`wandb sync` later", "online")
    return "offline", problem


def _login_problem() -> Optional[str]:
    return None if wandb_logged_in() else "not logged in to W&B (run `wandb login`, or set WANDB_API_KEY)"


def _reach_problem() -> Optional[str]:
    """Why the W&B server cannot be reached, or None: any HTTP answer counts, within REACH_TIMEOUT_S (name
    resolution included, hence the thread)."""
    import threading
    import urllib.error
    import urllib.request

    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    outcome: list[Optional[str]] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(url, timeout=REACH_TIMEOUT_S).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # the server answered
        except Exception as exc:  # noqa: BLE001 -- no route, no such host, refused, timed out
            reason = getattr(exc, "reason", exc)
            outcome.append(f"cannot reach the W&B server {url} ({reason})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(REACH_TIMEOUT_S)
    return outcome[0] if outcome else f"cannot reach the W&B server {url} (no answer in {REACH_TIMEOUT_S:g} s)"


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that is not a JSON object (cut short by a kill, edited
    by hand) is skipped with a warning naming the file and line, never an exception."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            print(f"ntp-rl: warning: {path}:{number}: not a JSON object, skipped", file=sys.stderr)
    return rows


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def _warn_nonfinite(values: dict[str, Any], step: int) -> None:
    """A NaN metric is written as null: say so on the console every time, so that it never
    passes unseen until someone plots the run."""
    bad = [f"{k}={v}" for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        from tqdm.auto import tqdm

        tqdm.write(f"warning: step {step}: non-finite metric(s) {', '.join(bad)} (NaN is written as null)", file=sys.stderr)


class Tracker:
    """Created on every process; only the main process writes anything."""

    def __init__(self, accelerator: Any, run_dir: Path, mode: str, *, stage: str, run_name: str, group: Optional[str],
                 tags: Sequence[str], cfg: Any, resume_step: Optional[int], wandb_id: Optional[str], logger_cfg: Any,
                 offline_because: str = ""):
        self.accelerator = accelerator
        self.run_dir = Path(run_dir)
        self.mode = mode
        self.is_main = accelerator.is_main_process
        self.wandb_run = None
        if not self.is_main:
            return
        self._metrics_path = self.run_dir / METRICS_FILE
        if resume_step is not None:
            self._drop_rows_after(resume_step)
        # A run that starts from step 0 in a directory that held one (killed before its first checkpoint) starts
        # its record again: its old rows would be repeated.
        self._metrics_file = open(self._metrics_path, "w" if resume_step is None else "a", buffering=1)
        if mode == "disabled":
            return
        if mode == "offline":
            self._say_offline(offline_because or "not logged in, or logger.wandb.mode=offline")
        init = {"name": run_name, "group": group or run_name, "job_type": stage, "tags": list(tags),
                "dir": str(self.run_dir), "mode": mode, "id": wandb_id, "resume": "allow",
                "entity": logger_cfg.wandb.entity, "settings": {"console": "off", "quiet": True, "silent": True}}
        config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        try:
            accelerator.init_trackers(logger_cfg.wandb.project, config=config, init_kwargs={"wandb": init})
        except Exception as exc:  # noqa: BLE001 -- W&B online failed after all (a key the server refuses)
            if mode != "online" or logger_cfg.wandb.mode is not WandbMode.auto:
                raise
            self._say_offline(f"W&B online failed: {first_line(exc)}")
            accelerator.trackers = []
            accelerator.init_trackers(logger_cfg.wandb.project, config=config,
                                      init_kwargs={"wandb": {**init, "mode": "offline"}})
        self.wandb_run = accelerator.get_tracker("wandb", unwrap=True)

    def _say_offline(self, why: str) -> None:
        print(f"W&B: offline ({why}), run files in {self.run_dir / 'wandb'} "
              f"(upload later with `wandb sync {self.run_dir / 'wandb'}/offline-run-*`)", file=sys.stderr)

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run repeats the steps after its checkpoint; keep one record of each."""
        if not self._metrics_path.exists():
            return
        kept = [json.dumps(r) for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        write_atomic(self._metrics_path, "".join(line + "\n" for line in kept))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        values = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        _warn_nonfinite(values, step)
        row = {"step": step, **{k: _clean(v) for k, v in values.items()}}
        with writing(self._metrics_path, f"the metrics of step {step}",
                     "free some space, then resume=auto continues from the last complete checkpoint"):
            self._metrics_file.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.is_main and self.wandb_run is not None:
            for key, value in values.items():
                self.wandb_run.summary[key] = _clean(value)

    def media(self, step: int, tables: Optional[dict[str, tuple[list[str], list[list]]]] = None,
              images: Optional[dict[str, Path]] = None) -> None:
        """W&B tables ({name: (columns, rows)}) and images (PNG paths); metrics.jsonl keeps numbers only."""
        if not self.is_main or self.wandb_run is None:
            return
        import wandb

        payload: dict[str, Any] = {name: wandb.Table(columns=list(columns), data=[list(r) for r in rows])
                                   for name, (columns, rows) in (tables or {}).items()}
        payload |= {name: wandb.Image(str(path)) for name, path in (images or {}).items()}
        if payload:
            self.wandb_run.log(payload, step=step)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.finish(failed=exc_type is not None)

    def finish(self, failed: bool = False) -> None:
        """Close metrics.jsonl and the W&B run (marked failed when the run raised), once."""
        if not self.is_main or self._metrics_file.closed:
            return
        self._metrics_file.close()
        if self.wandb_run is not None:
            if failed:
                self.wandb_run.finish(exit_code=1)
            else:
                self.accelerator.end_training()
