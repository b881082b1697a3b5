"""Checkpoints: Hugging Face weights plus everything needed to resume exactly.

A checkpoint directory `checkpoints/step_00000400/` holds
  model.safetensors, config.json, generation_config.json, tokenizer files
      -> `AutoModelForCausalLM.from_pretrained(dir)` needs nothing from ntp-rl; a bias-balanced
         MoE also holds its model's code (modeling_biased_moe.py, named in config.json's
         auto_map) and needs `trust_remote_code=True`: without it transformers refuses the
         checkpoint's model type rather than route without the router biases;
  optimizer.pt, trainer_state.pt (step, data position, scheduler, extra state),
  rng_state_<rank>.pt (one per process);
  under FSDP (ntp_rl/sharding.py) sharded/ instead of optimizer.pt: each process's shard of the
  model and optimizer state (torch.distributed.checkpoint), which resume reads on any number of
  processes; the weights beside it are the whole model in Hugging Face's sharded layout
  (model-000NN-of-000MM.safetensors + model.safetensors.index.json), one file per decoder layer,
  written a layer at a time (ntp_rl/export.py) so no process ever holds the whole model.
It is written into a hidden temporary directory and renamed into place only when whole,
so a kill during the write leaves the previous checkpoint as the latest one. Only
safetensors and `torch.load(weights_only=True)` are used to read it back.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from ntp_rl import sharding
from ntp_rl.errors import DataError, StorageError
from ntp_rl.export import write_streamed
from ntp_rl.faults import kill_point
from ntp_rl.io import writing
from ntp_rl.seeding import rng_state, set_rng_state

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.pt"
SHARDED_STATE = "sharded"


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / TRAINER_STATE).exists() and (path / "config.json").exists()


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path) -> Optional[Path]:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_model_dir(path: str, key: str) -> Path:
    """A run directory, a checkpoints/ directory or a model directory -> a loadable model directory."""
    p = Path(path)
    if (p / "config.json").exists():
        return p
    for root in (p / "checkpoints", p):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise DataError(f"{key}={path}: no model there (neither a run directory with checkpoints nor a model directory)")


def resolve_init_from(init_from: str) -> Any:
    """A run directory or checkpoint -> its latest model directory; a hub name stays a name (validation vetted it)."""
    return resolve_model_dir(init_from, key="init_from") if Path(init_from).exists() else init_from


def save_checkpoint(
    root: Path,
    step: int,
    accelerator: Any,
    model: torch.nn.Module,
    lm_of: Any,
    optimizer: torch.optim.Optimizer,
    tokenizer: Any,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a checkpoint on every process's behalf; all processes must call this together.

    `lm_of(unwrapped_model)` returns the Hugging Face model inside the training module.
    """
    root = Path(root)
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()

    previous = latest_checkpoint(root)
    then = (f"the previous checkpoint {previous} stays the latest: free some space, then resume=auto continues from it"
            if previous else "free some space, then resume=auto starts the run again")
    try:
        with writing(tmp, f"the checkpoint of step {step}", then):
            _write_checkpoint(tmp, step, accelerator, model, lm_of, optimizer, tokenizer, trainer_state)
    except StorageError:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the space it took is what the run's failure record needs
        raise
    if accelerator.is_main_process:
        if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    kill_point("checkpoint_done", step)
    return final


def _write_checkpoint(tmp: Path, step: int, accelerator: Any, model: torch.nn.Module, lm_of: Any,
                      optimizer: torch.optim.Optimizer, tokenizer: Any, trainer_state: dict[str, Any]) -> None:
    """Every file of a checkpoint, into its hidden directory; trainer_state.pt, which makes it complete, last."""
    if sharding.is_sharded(model):
        # Never the whole model in one process: written a layer at a time, every process gathering with the main one.
        write_streamed(tmp, lm_of(accelerator.unwrap_model(model)), accelerator.is_main_process)
        if accelerator.is_main_process and tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    else:
        _write_gathered(tmp, accelerator, model, lm_of, tokenizer)
    _save_optimizer(accelerator, model, optimizer, tmp)
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    kill_point("checkpoint_write", step)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / "trainer_state.json").write_text(json.dumps(_jsonable(trainer_state), indent=2) + "\n")


def _write_gathered(tmp: Path, accelerator: Any, model: torch.nn.Module, lm_of: Any, tokenizer: Any) -> None:
    """The Hugging Face export of an unsharded model, from its whole state dict (save_pretrained)."""
    full_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        lm = lm_of(accelerator.unwrap_model(model))
        prefix = _prefix_of(accelerator.unwrap_model(model), lm)
        lm_state = {k[len(prefix):]: v for k, v in full_state.items() if k.startswith(prefix)}
        # A gathered state dict holds a tied weight once per name, as copies that save_pretrained cannot see are tied.
        aliases = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
        lm_state = {k: v for k, v in lm_state.items() if k not in aliases}
        lm.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _prefix_of(module: torch.nn.Module, lm: torch.nn.Module) -> str:
    for name, sub in module.named_modules():
        if sub is lm:
            return f"{name}." if name else ""
    raise ValueError("the language model is not inside the training module")


def _save_optimizer(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    from accelerate.utils import DistributedType

    if sharding.is_sharded(model):
        sharding.save_sharded(directory / SHARDED_STATE, model, optimizer)
    elif accelerator.distributed_type == DistributedType.FSDP:
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(directory))
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def load_training_state(path: Path, accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer, this process's RNG, and return the trainer state of checkpoint `path`."""
    from accelerate.utils import DistributedType

    path = Path(path)
    try:
        if (path / SHARDED_STATE).is_dir():
            if not (sharding.is_sharded(model) or accelerator.num_processes == 1):
                raise DataError(f"resume: checkpoint {path} holds FSDP shards ({SHARDED_STATE}/); resume it with the "
                                "FSDP config (scripts/accelerate/fsdp.yaml) on any number of processes, or on one process")
            # DCP reads the shards into this run's layout: other shards, or the whole model on one process.
            sharding.load_sharded(path / SHARDED_STATE, accelerator.unwrap_model(model), getattr(optimizer, "optimizer", optimizer))
        elif sharding.is_sharded(model):
            raise DataError(f"resume: checkpoint {path} was written without FSDP (it has no {SHARDED_STATE}/); "
                            "resume it as it was launched, without the FSDP config")
        elif accelerator.distributed_type == DistributedType.FSDP:
            from accelerate.utils import load_fsdp_optimizer

            load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(path))
        else:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
        rng_file = path / f"rng_state_{accelerator.process_index}.pt"
        if rng_file.exists():  # absent when resuming on more processes than were saved
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise DataError(f"resume: checkpoint {path} is unreadable ({str(exc).splitlines()[0]})") from exc
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist() if value.numel() <= 16 else f"<tensor {tuple(value.shape)}>"
    return value
