"""Run directories: where a run's config, metrics, checkpoints and results live.

Rank 0 alone decides the directory and tells the other processes, because each process
would otherwise read its own clock. `run.json` says what state the run is in
(running / finished / failed / diverged), so a half-done run never looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from omegaconf import OmegaConf

from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.errors import ConfigError, StorageError, TrainingDiverged, first_line
from ntp_rl.io import write_atomic, write_json_atomic

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"


def read_run_info(path: Path) -> dict:
    try:
        return json.loads((Path(path) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return {}


def read_results(path: Path) -> Optional[dict]:
    """The results of a finished run, or None when it has not finished."""
    if read_run_info(path).get("status") != "finished":
        return None
    try:
        return json.loads((Path(path) / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return None


def source_run(given: str, used: Any) -> Optional[tuple[Path, str]]:
    """The ntp-rl run a model came from (the directory given, or the run of the checkpoint used) and its status."""
    for candidate in (Path(given), Path(str(used)).parent.parent):
        if (candidate / RUN_FILE).exists():
            return candidate, read_run_info(candidate).get("status", "unknown")
    return None


def run_name(stage: str, overrides: Sequence[str], explicit: Optional[str] = None) -> str:
    """`pretrain-loss=precision,loss.beta=-0.1`: the stage plus what the command changed."""
    if explicit:
        return explicit
    shown = setting_overrides(overrides)
    return f"{stage}-{','.join(shown)}" if shown else stage


# Keys that say where or how a run is recorded, not what it computes.
BOOKKEEPING_KEYS = {"run_dir", "resume", "out_dir", "data.cache_dir", "logger.wandb.mode", "logger.wandb.project",
                    "logger.wandb.entity", "logger.wandb.group", "logger.wandb.name", "logger.wandb.tags",
                    "logger.progress_bar", "objective", "resume_allow_changes"}
# Keys a resumed run may change freely besides those: how often it logs, evaluates and saves.
CADENCE_KEYS = {"train.log_every", "train.eval_every", "train.save_every", "train.keep_last", "rl.log_every",
                "rl.save_every"}


def setting_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that change what a run computes: its name and its W&B tags (64 characters at most)."""
    return [o[:64] for o in overrides if o.split("=", 1)[0].lstrip("+~") not in BOOKKEEPING_KEYS]


def dir_name(name: str) -> str:
    """A run name as a directory name: odd characters replaced, and a long name shortened
    with a hash of the whole, so two long names that differ only at the end stay apart."""
    safe = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", name)
    if len(safe) <= 120:
        return safe
    return f"{safe[:110]}-{hashlib.sha1(name.encode()).hexdigest()[:9]}"


@dataclass
class RunDir:
    path: Path
    name: str
    resume_from: Optional[Path] = None  # the checkpoint this run continues from
    info: dict = field(default_factory=dict)
    config_changes: list = field(default_factory=list)  # keys resumed with another value (resume_allow_changes)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def update(self, **info: Any) -> None:
        """Record the run's state in run.json (main process only)."""
        self.info.update(info, updated_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        write_json_atomic(self.path / RUN_FILE, self.info)

    def write_config(self, cfg: Any) -> None:
        write_atomic(self.path / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))


def choose_run_dir(cfg: Any, stage: str, overrides: Sequence[str]) -> RunDir:
    """Decide (on rank 0) where this run lives and which checkpoint, if any, it resumes.

    resume=auto with no run_dir picks the newest unfinished run of the same name, so
    re-running the command that crashed carries on where it stopped.
    """
    name = run_name(stage, overrides, cfg.logger.wandb.name)
    stage_root = Path(cfg.out_dir) / stage
    resume = cfg.resume if cfg.resume not in (None, "never") else None

    path: Optional[Path] = None
    key = "run_dir"
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    elif resume == "auto":
        path, key = _newest_unfinished(stage_root, dir_name(name)), "resume"
    elif resume:
        path, key = _run_dir_of_checkpoint(Path(resume)), "resume"

    resume_from: Optional[Path] = None
    if resume == "auto":
        resume_from = latest_checkpoint(path / "checkpoints") if path is not None else None
    elif resume:
        resume_from = Path(resume)
        if latest_checkpoint(resume_from.parent) is None or not (resume_from / "trainer_state.pt").exists():
            raise ConfigError("resume", "is not a complete ntp-rl checkpoint (no trainer_state.pt)", resume)
    elif path is not None and latest_checkpoint(path / "checkpoints") is not None:
        raise ConfigError("run_dir", "already holds checkpoints of a run; pass resume=auto to continue it, "
                          "or choose another run_dir", str(path))
    if path is None:
        path = claim_fresh(stage_root, name)
    else:
        lock(path, key)

    info = read_run_info(path) if resume_from else {}
    changes = config_changes(path, cfg) if resume_from else []
    if changes and not cfg.get("resume_allow_changes", False):
        shown = ", ".join(f"{c['key']}={c['was']} (now {c['now']})" for c in changes)
        raise ConfigError("resume", f"{shown_path(path)} was trained with another config: {shown}; run the command "
                          "it was started with, start a new run, or pass resume_allow_changes=true to continue it "
                          "with this config (recorded in its run.json)", cfg.resume)
    return RunDir(path=path, name=name, resume_from=resume_from, info=info, config_changes=changes)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def config_changes(path: Path, cfg: Any) -> list[dict]:
    """The keys, other than bookkeeping and cadence, whose value differs from the run's own config.yaml.

    A key the run's config.yaml lacks (it was saved by an ntp-rl without that key) ran as the key's schema
    default, which is how a new key keeps the old behaviour: set to anything else, it is a change (an old RL
    run continued with rl.plateau, say). A key only the old config has, or one with no schema default, is not.
    """
    try:
        was = _flat(OmegaConf.to_container(OmegaConf.load(Path(path) / CONFIG_FILE), resolve=True))
    except Exception:  # noqa: BLE001 -- no config.yaml, or one YAML cannot read: nothing to compare with
        return []
    now = _flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    free = BOOKKEEPING_KEYS | CADENCE_KEYS
    defaults = _schema_defaults(cfg) if now.keys() - was.keys() else {}
    was |= {key: defaults[key] for key in now.keys() - was.keys() if key in defaults}
    return [{"key": key, "was": was[key], "now": now[key]} for key in sorted(was.keys() & now.keys())
            if key not in free and not key.startswith("logger.") and was[key] != now[key]]


def _schema_defaults(cfg: Any) -> dict[str, Any]:
    """Every key's default in the config's dataclasses (flat), where it has one that is a plain value."""
    schema = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(schema):
        return {}
    defaults = _flat(OmegaConf.to_container(OmegaConf.structured(schema), resolve=False, enum_to_str=True))
    return {key: value for key, value in defaults.items()
            if not (isinstance(value, str) and (value == "???" or value.startswith("${")))}


# Run directories this process writes: the open descriptor of each one's lock file (held for
# the run's life), and those it created, which are removed again if the run never started.
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}
_created: set[Path] = set()


def claim_fresh(stage_root: Path, name: str) -> Path:
    """A new directory `<time>-<name>`, created atomically: a second process in the same
    second finds it taken and claims `<time>-<name>-1` instead."""
    path = make_fresh(stage_root, f"{time.strftime('%Y%m%d-%H%M%S')}-{dir_name(name)}")
    _created.add(path)
    lock(path, "run_dir")
    return path


def make_fresh(parent: Path, name: str) -> Path:
    """`parent/name`, created by this call and no other: taken already, `name-1`, `name-2`, ..."""
    parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        path = parent / (name + (f"-{suffix}" if suffix else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            suffix += 1


def lock(path: Path, key: str) -> None:
    """Hold an exclusive lock on the run directory until the run ends, or refuse in one line:
    two processes writing one run would interleave its metrics and checkpoints.

    The lock file is never deleted while the directory lives: a deleted lock file lets two
    processes lock two different files of the same name.
    """
    import fcntl

    path = Path(path)
    if path in _held:
        return
    if not path.exists():
        path.mkdir(parents=True)
        _created.add(path)
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(key, f"{path} is being written by another ntp-rl process right now; wait for it to stop "
                          "(then resume=auto continues it), or start a separate run") from None
    _held[path] = fd


def release(path: Path) -> None:
    """Unlock a run directory; one this process created and never started a run in is removed."""
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock
    if path in _created:
        _created.discard(path)
        if path.is_dir() and {p.name for p in path.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def claims_released() -> Iterator[None]:
    """Release, when the block ends, the run directories claimed inside it (a pipeline's
    stages each release their own; the lineage's stays held by the pipeline)."""
    before = set(_held) | set(_created)
    try:
        yield
    finally:
        for path in (set(_held) | set(_created)) - before:
            release(path)


def _newest_unfinished(stage_root: Path, safe_name: str) -> Optional[Path]:
    """The newest run of this name that has not finished: with a complete checkpoint it resumes from it; without
    one (killed before its first) it starts again from step 0 in its own directory."""
    pattern = re.compile(r"^\d{8}-\d{6}-" + re.escape(safe_name) + r"(-\d+)?$")
    candidates = sorted((p for p in stage_root.glob("*") if pattern.match(p.name)), reverse=True)
    for path in candidates:
        if read_run_info(path).get("status") not in (None, "finished"):
            return path
    return None


def _run_dir_of_checkpoint(checkpoint: Path) -> Path:
    # <run_dir>/checkpoints/step_XXXXXXXX
    return checkpoint.resolve().parent.parent


def create(run: RunDir, cfg: Any, stage: str, overrides: Sequence[str], world_size: int) -> None:
    """Make the directory and its first records (main process only)."""
    run.path.mkdir(parents=True, exist_ok=True)
    run.checkpoints.mkdir(exist_ok=True)
    run.write_config(cfg)
    started = run.info.get("started_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
    changes = run.info.get("config_changes", [])
    if run.config_changes:  # each resume that changed the config, with the step it changed at
        changes = [*changes, {"resumed_from": str(run.resume_from), "changes": run.config_changes}]
    run.update(stage=stage, name=run.name, status="running", started_at=started, overrides=list(overrides),
               world_size=world_size, resumed_from=str(run.resume_from) if run.resume_from else None,
               **({"config_changes": changes} if changes else {}))


# Runs this process marked interrupted (Ctrl-C, SIGTERM), newest last: the CLI's one line names the last.
INTERRUPTED: list[Path] = []


def shown_path(path: Path) -> str:
    """A path as the console shows it: relative to the current directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def mark_stopped(run: RunDir, exc: BaseException) -> None:
    """Record in run.json why a run stopped early, so it never looks finished."""
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or a signal (ntp_rl.stopping.Stopped: SIGTERM, pre-emption)
        run.update(status="interrupted", signal=getattr(exc, "signame", "SIGINT"))
        INTERRUPTED.append(run.path)
    else:
        run.update(status="failed", error=f"{type(exc).__name__}: {first_line(exc)}")


@contextmanager
def recording_failures(run: RunDir, is_main: bool) -> Iterator[None]:
    """Whatever stops the run early is written to run.json, so it never looks finished."""
    try:
        yield
    except TrainingDiverged:
        raise  # already recorded, with the step and the last good checkpoint
    except BaseException as exc:
        if is_main and run.path.is_dir():
            try:
                mark_stopped(run, exc)
            except StorageError:
                pass  # a disk too full for run.json too: the error being raised says why the run stopped
        raise
