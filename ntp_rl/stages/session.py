"""What every stage does around its own loop, written once.

    session = StageSession("pretrain", cfg, overrides, precision=cfg.train.precision)
    ...build what a user can get wrong (data, model); nothing is written yet...
    session.choose_run_dir()                  # rank 0 decides; every rank learns the answer
    if (done := session.finished_results(max_steps)) is not None:
        return done                           # resume=auto of a run that already finished
    with session.open(resume_step) as tracker:  # run.json, config.yaml, W&B; failures are recorded
        bar = session.progress(...)
        ...the stage's own loop...
        return session.finish(results, step=..., checkpoint=...)

A run whose code raises is marked failed (or interrupted) in run.json and its W&B run is
closed as failed, so a half-done run never looks complete.
"""

from __future__ import annotations

import secrets
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from ntp_rl import rundir, sharding
from ntp_rl.checkpoint import TRAINER_STATE, latest_checkpoint
from ntp_rl.errors import TrainingDiverged
from ntp_rl.io import write_json_atomic
from ntp_rl.rundir import RESULTS_FILE, RunDir
from ntp_rl.runtime import check_parallelism, environment, make_accelerator, parallelism
from ntp_rl.tracking import Tracker, resolve_wandb


class StageSession:
    """One run of a stage on this process: its accelerator, run directory, records and console."""

    def __init__(self, stage: str, cfg: Any, overrides: Sequence[str], precision: Any):
        self.stage = stage
        self.cfg = cfg
        self.overrides = list(overrides)
        self.wandb_mode, self.wandb_offline_because = resolve_wandb(cfg.logger.wandb.mode)
        self.accelerator = make_accelerator(precision, self.wandb_mode)
        check_parallelism(self.accelerator)
        self.is_main = self.accelerator.is_main_process
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        # FSDP2 is ntp-rl's own sharding (ntp_rl/sharding.py), not something accelerator.prepare does.
        self.sharded = sharding.requested() and self.world > 1
        self.bf16 = self.accelerator.mixed_precision == "bf16"
        # Under FSDP only the first process materialises the whole model; the others build its shape on the
        # meta device and receive their shards from it (sharding.shard).
        self.empty_model = self.sharded and self.rank != 0
        self.run_dir: Optional[RunDir] = None
        self.tracker: Optional[Tracker] = None
        self.notices: dict[str, Any] = {}  # what was dropped, skipped or suspicious: results.json's `notices`

    def prepare(self, model: torch.nn.Module, lm: torch.nn.Module, make_optimizer: Any) -> tuple[Any, Any]:
        """The training module (holding the Hugging Face model `lm`) and its optimizer, `make_optimizer(model)`,
        ready for this launch: under FSDP2 sharded first, so that the optimizer holds (and keeps state for) the
        shards only; otherwise both through Accelerate (DDP wraps the module)."""
        if self.sharded:
            model = sharding.shard(model, lm, self.device, bf16=self.bf16)
            return model, make_optimizer(model)
        return self.accelerator.prepare(model, make_optimizer(model))

    def gradient_sync(self, model: Any, sync: bool) -> Any:
        """The context of one micro-batch's backward: gradients are averaged over processes only when `sync`
        (the step's last micro-batch)."""
        if self.sharded:
            return sharding.gradient_sync(model, sync)
        return nullcontext() if sync else self.accelerator.no_sync(model)

    def say(self, message: str) -> None:
        """A console line from the main process; tqdm.write keeps a progress bar intact below it."""
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(message)

    def notice(self, key: str, value: Any, message: str) -> None:
        """Something dropped, skipped or suspicious: said once on the console, and kept under `key` in
        results.json's `notices`, so that nothing degrades a run silently."""
        if key not in self.notices:
            self.say(f"  note: {message}")
        self.notices[key] = value

    def note_unread_answers(self, task: Any) -> None:
        """Task rows left out because their reference answer could not be read (hf_math): counted and said."""
        unread = getattr(task, "unread_answers", None)
        if unread:
            self.notice("task_rows_without_answer", dict(unread), f"task={task.name}: rows whose reference answer "
                        f"could not be read were left out: {', '.join(f'{n} in {s}' for s, n in unread.items())}")

    def note_source_run(self, key: str, given: str, used: Any) -> None:
        """Starting from a run that is not finished (still running, failed, interrupted) is allowed, but said,
        with the checkpoint used."""
        source = rundir.source_run(given, used)
        if source is not None and source[1] != "finished":
            self.notice(f"{key}_status", source[1], f"{key}={given} is a run whose status is {source[1]}, not finished; "
                        f"using its checkpoint {used}")

    def choose_run_dir(self, name_overrides: Optional[Sequence[str]] = None) -> RunDir:
        """Rank 0 decides the run directory (and the checkpoint to resume); every rank gets the same answer.

        Nothing is written yet, so a mistake found while building the model leaves no trace.
        `name_overrides` name the run when the command line's overrides would not say it well.
        """
        from accelerate.utils import broadcast_object_list

        chosen: list[Any] = [None, None]  # the RunDir, or the error that stopped rank 0
        if self.is_main:
            try:
                chosen[0] = rundir.choose_run_dir(self.cfg, self.stage, name_overrides or self.overrides)
            except Exception as exc:  # every rank must learn of it, or the others hang
                chosen[1] = exc
        if self.world > 1:
            broadcast_object_list(chosen)
        if chosen[1] is not None:
            raise chosen[1]
        self.run_dir = chosen[0]
        if self.run_dir.config_changes:
            shown = ", ".join(f"{c['key']} {c['was']} -> {c['now']}" for c in self.run_dir.config_changes)
            self.notice("config_changes", self.run_dir.config_changes, f"resume_allow_changes=true: "
                        f"{rundir.shown_path(self.run_dir.path)} continues from {self.run_dir.resume_from} with a "
                        f"changed config: {shown} (recorded in its run.json)")
        if self.cfg.resume == "auto" and self.run_dir.resume_from is None:
            if rundir.read_run_info(self.run_dir.path):
                self.notice("resume_auto_restarted", True, f"resume=auto: {rundir.shown_path(self.run_dir.path)} has "
                            "no complete checkpoint yet; its run starts again from step 0")
            else:
                self.notice("resume_auto_found_nothing", True, f"resume=auto found no unfinished run of this command "
                            f"to resume; a new run starts in {rundir.shown_path(self.run_dir.path)}")
        return self.run_dir

    @property
    def resume_from(self) -> Optional[Path]:
        return self.run_dir.resume_from if self.run_dir else None

    def resume_step(self) -> Optional[int]:
        """The step of the checkpoint this run resumes from (None for a fresh run)."""
        if self.resume_from is None:
            return None
        return int(torch.load(Path(self.resume_from) / TRAINER_STATE, map_location="cpu", weights_only=True)["step"])

    def finished_results(self, max_steps: int) -> Optional[dict]:
        """The results of this run if it already finished: all `max_steps`, or stopped early by its own rule
        (pretrain's train.stop_at) (resume=auto of a finished run)."""
        finished = rundir.read_results(self.run_dir.path) if self.resume_from else None
        if finished is None or (finished["step"] < max_steps and not finished.get("stopped_at")):
            return None
        self.accelerator.print(f"ntp-rl {self.stage}: {rundir.shown_path(self.run_dir.path)} already finished at step {finished['step']}")
        return finished

    @contextmanager
    def open(self, resume_step: Optional[int] = None) -> Iterator[Tracker]:
        """Create the run directory and its records, start tracking (W&B + metrics.jsonl), and record
        in run.json whatever stops the run early."""
        run, cfg = self.run_dir, self.cfg
        with rundir.recording_failures(run, self.is_main):
            if self.is_main:
                if "wandb_id" not in run.info and self.wandb_mode != "disabled":
                    run.info["wandb_id"] = secrets.token_hex(6)  # kept in run.json: a resumed run logs to the same W&B run
                rundir.create(run, cfg, self.stage, self.overrides, self.world)
                run.update(environment=environment(self.device, parallelism(self.accelerator)))
            self.accelerator.wait_for_everyone()
            run.info = rundir.read_run_info(run.path)  # the other ranks learn the W&B id here
            # A pipeline stage's overrides and its configured tags both carry the lineage's settings.
            tags = list(dict.fromkeys([*rundir.setting_overrides(self.overrides), *cfg.logger.wandb.tags]))
            with Tracker(self.accelerator, run.path, self.wandb_mode, stage=self.stage, run_name=run.name,
                         group=cfg.logger.wandb.group, tags=tags, cfg=cfg, resume_step=resume_step,
                         wandb_id=run.info.get("wandb_id"), logger_cfg=cfg.logger,
                         offline_because=self.wandb_offline_because) as tracker:
                self.tracker = tracker
                yield tracker

    def progress(self, total: int, initial: int = 0, desc: Optional[str] = None, unit: str = "it",
                 logs: bool = False) -> Any:
        """A progress bar on a terminal; on a log file or a pipe, plain lines (PlainProgress), not \\r frames:
        at the stage's log interval when it `logs` (calls set_postfix), else every tenth of the way."""
        from tqdm.auto import tqdm

        if not sys.stderr.isatty():
            return PlainProgress(total, initial, desc or self.stage, unit, logs,
                                 enabled=self.is_main and self.cfg.logger.progress_bar)
        return tqdm(total=total, initial=initial, desc=desc or self.stage, unit=unit, dynamic_ncols=True,
                    disable=not (self.is_main and self.cfg.logger.progress_bar))

    def finish(self, results: dict, **info: Any) -> dict:
        """Write results.json and mark the run finished (main process), then wait for every process."""
        if self.notices:
            results["notices"] = dict(self.notices)
        if self.is_main:
            write_json_atomic(self.run_dir.path / RESULTS_FILE, results)
            self.run_dir.update(status="finished", **info)
        self.accelerator.wait_for_everyone()
        return results

    def stop_diverged(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, bar: Any) -> None:
        """Record in run.json that the run diverged at `step`, and stop it; nothing from this step is saved."""
        bar.close()
        last = latest_checkpoint(self.run_dir.checkpoints)
        message = (f"training diverged at step {step}: loss {loss.item():.4g}, grad norm {grad_norm.item():.4g} "
                   f"(non-finite); nothing was saved from this step; last good checkpoint: {last or 'none'}")
        if self.is_main:
            self.run_dir.update(status="diverged", error=message)
        raise TrainingDiverged(message)


class PlainProgress:
    """Progress for a console that is not a terminal (a log file, a pipe): a plain line each time the
    stage logs (set_postfix, at its log interval), or each tenth of the way for a stage that does
    not log; a terminal's bar would write thousands of \\r frames into the file instead."""

    def __init__(self, total: int, initial: int, desc: str, unit: str, logs: bool, enabled: bool):
        self.total, self.n, self.desc, self.unit, self.enabled = total, initial, desc, unit, enabled
        self.started = time.perf_counter()
        self.logs = logs  # the stage calls set_postfix: lines follow its log interval
        self.tenth = max(1, total // 10)
        self.next_line = initial + self.tenth

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.logs and (self.n >= self.next_line or self.n == self.total):
            self.next_line = self.n + self.tenth
            self._line({})

    def set_postfix(self, **fields: Any) -> None:
        self._line(fields)

    def close(self) -> None:
        pass

    def _line(self, fields: dict) -> None:
        if self.enabled:
            shown = "".join(f" | {key} {value}" for key, value in fields.items())
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} | {time.perf_counter() - self.started:.0f}s{shown}",
                  flush=True)
