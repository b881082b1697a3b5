"""`ntp-rl pipeline`: pretrain [-> midtrain] -> eval (base) -> rl -> eval (after RL), as one lineage.

The lineage directory is a pure function of the settings (outputs/pipeline/<name>), so
running the same command again skips the stages that finished and resumes the one that
was interrupted. Each stage is an ordinary run in its own subdirectory (pretrain/,
eval_base/, rl/, eval_rl/), reads the previous stage's checkpoint, and logs to W&B as its
own run: group = the lineage, job_type = the stage, tags = the settings.

A sweep of lineages (`-m`, or an experiment such as `experiment=paper_small`) is Hydra's:
one job per lineage, through the launcher chosen (ntp_rl/sweeps.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.config.compose import compose
from ntp_rl.config.pipeline_schema import LINEAGE_STAGES
from ntp_rl.errors import ConfigError
from ntp_rl.io import write_json_atomic
from ntp_rl.rundir import (RESULTS_FILE, RunDir, dir_name, lock, mark_stopped, read_results, read_run_info, run_name,
                           setting_overrides, shown_path)

# The stage (of the stage table) each stage of a lineage runs, and the lineage stage whose
# checkpoint it starts from.
# "base" is the lineage's base model: the mid-trained one when the lineage has a midtrain stage.
RUNS = {"pretrain": "pretrain", "midtrain": "midtrain", "eval_base": "eval", "rl": "rl", "eval_rl": "eval"}
UPSTREAM = {"midtrain": "pretrain", "eval_base": "base", "rl": "base", "eval_rl": "rl"}
assert tuple(RUNS) == LINEAGE_STAGES


def upstream_dir(lineage_stage: str, cfg: Any, lineage: Path) -> Path:
    """The directory of the stage whose checkpoint `lineage_stage` starts from."""
    upstream = UPSTREAM.get(lineage_stage, "")
    if upstream == "base":
        # A midtrain run left by an earlier command counts too: `stages=[rl]` then starts where eval_base did.
        upstream = "midtrain" if "midtrain" in cfg.stages or (lineage / "midtrain").exists() else "pretrain"
    return lineage / upstream


def lineage_dir(cfg: Any, overrides: Sequence[str]) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out_dir) / "pipeline" / dir_name(lineage_name(overrides))


def lineage_name(overrides: Sequence[str]) -> str:
    return run_name("pipeline", setting_overrides(overrides))


def stage_config(lineage_stage: str, cfg: Any, lineage: Path, name: str, tags: Sequence[str]) -> Any:
    """The full config of one stage of the lineage: its own defaults, then the pipeline's sections."""
    stage = RUNS[lineage_stage]
    stage_cfg = compose(stage, ["model=hf"] if stage == "eval" else [])
    # Paths are set on the composed config, not as overrides: lineage names hold "=".
    upstream = str(upstream_dir(lineage_stage, cfg, lineage))
    if stage == "eval":
        stage_cfg.model.name_or_path = upstream
    elif stage in ("rl", "midtrain"):
        stage_cfg.init_from = upstream
    # resume_allow_changes reaches the stage the pipeline resumes: a lineage's RL continued with more steps.
    shared = {"seed": cfg.seed, "out_dir": cfg.out_dir, "run_dir": str(lineage / lineage_stage), "resume": None,
              "resume_allow_changes": cfg.resume_allow_changes,
              "logger": OmegaConf.merge(cfg.logger, {"wandb": {"group": cfg.logger.wandb.group or name,
                                                               "name": f"{name}/{lineage_stage}",
                                                               "tags": [*cfg.logger.wandb.tags, *tags]}})}
    sections = {
        "pretrain": {"model": cfg.model, "data": cfg.data, "loss": cfg.loss, "optim": cfg.optim, "train": cfg.train,
                     "task": cfg.task},
        # The pre-training's settings, but for what mid-training changes (PipelineConfig.midtrain); train.stop_at
        # decides when pre-training ends, not mid-training.
        "midtrain": {"data": OmegaConf.merge(cfg.data, {"seq_len": cfg.midtrain.seq_len}), "loss": midtrain_loss(cfg),
                     "optim": cfg.midtrain_optim, "train": OmegaConf.merge(cfg.train, {"max_steps": cfg.midtrain.max_steps,
                                                                                      "stop_at": {"accuracy": None}})},
        "rl": {"task": cfg.task, "rl": cfg.rl, "optim": cfg.rl_optim, "generator": cfg.generator},
        "eval": {"task": cfg.task, "eval": cfg.eval, "sampling": cfg.sampling, "diagnostics": cfg.diagnostics,
                 "data": cfg.data, "generator": cfg.generator},
    }[stage]
    for key, value in {**shared, **sections}.items():
        stage_cfg[key] = value
    if stage == "midtrain":  # the model is the pre-trained one (init_from), with the new positions
        stage_cfg.model.rope_theta = cfg.midtrain.rope_theta
    if stage == "eval":  # the held-out text follows the task's difficulty, as in `ntp-rl eval`
        stage_cfg.data.difficulty = cfg.task.difficulty
    return stage_cfg


def midtrain_loss(cfg: Any) -> Any:
    """Mid-training's loss: the preset midtrain.loss names, with that preset's own numbers (none of the
    pipeline's loss.* carry over), or the pipeline's loss when it is unset."""
    if cfg.midtrain.loss is None:
        return cfg.loss
    return compose("midtrain", [f"loss={cfg.midtrain.loss}"]).loss


def check_one_precision(cfg: Any) -> None:
    """The stages run in one process, and Accelerate keeps one mixed-precision setting per process."""
    from ntp_rl.runtime import resolved_precision

    precisions = {key: resolved_precision(cfg[key].precision) for key in ("train", "rl", "eval")}
    if len(set(precisions.values())) > 1:
        raise ConfigError("train.precision", "train.precision, rl.precision and eval.precision must be the same in a "
                          "pipeline (one process runs every stage); got "
                          f"{', '.join(f'{k}={v.value}' for k, v in precisions.items())}")


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    check_one_precision(cfg)
    from ntp_rl.runtime import process_state
    from ntp_rl.stages import run_stage

    state = process_state()
    name = lineage_name(overrides)
    lineage = lineage_dir(cfg, overrides)
    record = open_lineage(cfg, overrides, lineage, name, state.is_main_process)
    state.wait_for_everyone()
    say = print if state.is_main_process else (lambda message: None)
    say(f"ntp-rl pipeline {name} -> {shown_path(lineage)}: {' -> '.join(cfg.stages)}")

    results: dict[str, Any] = {}
    try:
        for lineage_stage in cfg.stages:
            stage_dir = lineage / lineage_stage
            done = read_results(stage_dir)
            if done is not None:
                say(f"[{lineage_stage}] already finished: {stage_dir}")
                results[lineage_stage] = done
                continue
            stage_cfg = stage_config(lineage_stage, cfg, lineage, name, setting_overrides(overrides))
            if latest_checkpoint(stage_dir / "checkpoints") is not None:
                stage_cfg.resume = "auto"
                say(f"[{lineage_stage}] resuming {stage_dir}")
            elif stage_dir.exists() and state.is_main_process:
                shutil.rmtree(stage_dir)  # an attempt that died before its first checkpoint: nothing to keep
            state.wait_for_everyone()
            results[lineage_stage] = run_stage(RUNS[lineage_stage], stage_cfg, overrides=setting_overrides(overrides))
    except BaseException as exc:  # a stage that diverged too: the lineage did not finish
        if state.is_main_process:
            mark_stopped(record, exc)
        raise
    summary = lineage_summary(results)
    if state.is_main_process:
        write_json_atomic(lineage / RESULTS_FILE, {"stage": "pipeline", "name": name, "summary": summary,
                                                   "stages": {s: str(lineage / s) for s in cfg.stages}})
        record.update(status="finished")
    say(f"pipeline {name} done: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return {"lineage": str(lineage), "summary": summary, "stages": results}


def open_lineage(cfg: Any, overrides: Sequence[str], lineage: Path, name: str, is_main: bool) -> RunDir:
    """The lineage's own directory and run.json (main process); a re-run keeps its start time."""
    record = RunDir(path=lineage, name=name, info=read_run_info(lineage))
    if is_main:
        lock(lineage, "run_dir")  # two identical pipeline commands must not run one lineage
        OmegaConf.save(cfg, lineage / "config.yaml", resolve=True)
        record.update(stage="pipeline", name=name, status="running", overrides=list(overrides),
                      stages=list(cfg.stages), started_at=record.info.get("started_at", time.strftime("%Y-%m-%dT%H:%M:%S")))
    return record


def lineage_summary(results: dict[str, Any]) -> dict[str, float]:
    """The lineage's headline numbers: pre- (and mid-)training NLL and entropy, and each eval's avg@n, cons@n, pass@1, pass@n."""
    summary: dict[str, float] = {}
    for stage in ("pretrain", "midtrain"):
        val = (results.get(stage) or {}).get("val", {})
        summary |= {f"{stage}_{key}": val[key] for key in ("nll", "entropy") if key in val}
    for lineage_stage, prefix in (("eval_base", "base"), ("eval_rl", "rl")):
        scores = (results.get(lineage_stage) or {}).get("summary") or {}
        ks = sorted(int(key[5:]) for key in scores if key.startswith("pass@"))
        wanted = [key for key in scores if key.startswith(("avg@", "cons@"))] + [f"pass@{k}" for k in ks[:1] + ks[-1:]]
        summary |= {f"{prefix}_{key}": scores[key] for key in dict.fromkeys(wanted)}
    return summary
