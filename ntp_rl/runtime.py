"""What every stage sets up the same way: Accelerate, the run directory, tracking, perf figures."""

from __future__ import annotations

import resource
import secrets
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ntp_rl import rundir
from ntp_rl.checkpoint import TRAINER_STATE, latest_checkpoint
from ntp_rl.config import Precision, resolved_precision
from ntp_rl.errors import TrainingDiverged
from ntp_rl.rundir import RunDir
from ntp_rl.tracking import Tracker, wandb_mode

# Dense bf16 peak of the cards people run this on, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def make_accelerator(precision: Any, wandb_mode_resolved: str) -> Any:
    from accelerate import Accelerator

    mixed = "bf16" if resolved_precision(precision) is Precision.bf16 else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log_with = None if wandb_mode_resolved == "disabled" else "wandb"
    # cpu=True on machines without a GPU is what makes several launched processes form a
    # gloo process group (Accelerate's MULTI_CPU) instead of each training alone.
    return Accelerator(mixed_precision=mixed, log_with=log_with, cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False)


def choose_run(cfg: Any, stage: str, overrides: Sequence[str], accelerator: Any) -> RunDir:
    """Rank 0 decides the run directory (and the checkpoint to resume); every rank gets the same answer.

    Nothing is written yet, so a mistake found while building the model leaves no trace.
    """
    from accelerate.utils import broadcast_object_list

    chosen: list[Any] = [None, None]  # the RunDir, or the error that stopped rank 0
    if accelerator.is_main_process:
        try:
            chosen[0] = rundir.choose_run_dir(cfg, stage, overrides)
        except Exception as exc:  # every rank must learn of it, or the others hang
            chosen[1] = exc
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen)
    if chosen[1] is not None:
        raise chosen[1]
    return chosen[0]


def open_run(run: RunDir, cfg: Any, stage: str, overrides: Sequence[str], accelerator: Any, mode: str,
             resume_step: Optional[int]) -> Tracker:
    """Create the run directory and its records, and start tracking (W&B + metrics.jsonl)."""
    if accelerator.is_main_process:
        if "wandb_id" not in run.info and mode != "disabled":
            run.info["wandb_id"] = secrets.token_hex(6)  # kept in run.json so a resumed run logs to the same W&B run
        rundir.create(run, cfg, stage, overrides, accelerator.num_processes)
    accelerator.wait_for_everyone()
    run.info = rundir.read_run_info(run.path)  # the other ranks learn the W&B id here
    tags = [*rundir.setting_overrides(overrides), *cfg.logger.wandb.tags]
    return Tracker(accelerator, run.path, mode, stage=stage, run_name=run.name, group=cfg.logger.wandb.group,
                   tags=tags, cfg=cfg, resume_step=resume_step, wandb_id=run.info.get("wandb_id"),
                   logger_cfg=cfg.logger)


def resolved_wandb_mode(cfg: Any) -> str:
    return wandb_mode(cfg.logger.wandb.mode)


def printer(is_main: bool):
    from tqdm.auto import tqdm

    # tqdm.write keeps the progress bar intact below the printed lines.
    return (lambda message: tqdm.write(message)) if is_main else (lambda message: None)


def saved_step(path: Path) -> int:
    return int(torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)["step"])


def stop_diverged(step: int, loss: torch.Tensor, grad_norm: torch.Tensor, run_dir: RunDir, tracker: Tracker, bar: Any) -> None:
    """Record in run.json that the run diverged at `step`, and stop it; nothing from this step is saved."""
    bar.close()
    last = latest_checkpoint(run_dir.checkpoints)
    message = (f"training diverged at step {step}: loss {loss.item():.4g}, grad norm {grad_norm.item():.4g} "
               f"(non-finite); nothing was saved from this step; last good checkpoint: {last or 'none'}")
    if tracker.is_main:
        run_dir.update(status="diverged", error=message)
    raise TrainingDiverged(message)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(num_params_no_embedding: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM appendix B)."""
    return 6 * num_params_no_embedding + 12 * num_layers * num_heads * head_dim * seq_len
