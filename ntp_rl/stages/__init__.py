"""The stage table: every stage declared once, read by the CLI, the pipeline and the docs.

A stage with a schema is configured by Hydra (`ntp-rl <stage> key=value ...`); its
`validate` runs once when it is dispatched, and its module's `run(cfg, overrides)` reads top
to bottom as named phases. A stage without a schema (compare, export) takes plain arguments.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ntp_rl.config import pipeline_schema, schema
from ntp_rl.config import validate as checks


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line of `ntp-rl --help`
    module: str  # run(cfg, overrides) for a configured stage, main(argv) for one with plain arguments
    schema: Optional[type] = None  # the dataclass its YAML (conf/<name>.yaml) is merged into
    validate: Optional[Callable[[Any], None]] = None  # every check that needs the config alone
    keys: tuple[str, ...] = ()  # its most used keys, which `ntp-rl <stage> --help` explains

    def run(self, cfg: Any, overrides: Sequence[str] = ()) -> Any:
        return importlib.import_module(self.module).run(cfg, overrides=list(overrides))

    def main(self, argv: Sequence[str]) -> Any:
        return importlib.import_module(self.module).main(list(argv))


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", "pre-train a model with the reward-shaped next-token loss", "ntp_rl.stages.pretrain",
          schema.PretrainConfig, checks.validate_pretrain,
          ("loss.beta", "loss.lambda_top", "loss.lambda_tail", "loss.k", "train.max_steps", "train.batch_size",
           "optim.lr", "data.seq_len", "train.stop_at.accuracy", "seed", "resume", "run_dir")),
    Stage("midtrain", "continue pre-training a checkpoint with a new RoPE base, sequence length and schedule",
          "ntp_rl.stages.pretrain", schema.MidtrainConfig, checks.validate_midtrain,
          ("init_from", "model.rope_theta", "data.seq_len", "train.max_steps", "optim.lr", "optim.min_lr_ratio", "seed",
           "resume")),
    Stage("rl", "GRPO with verifiable rewards from a pre-trained checkpoint", "ntp_rl.stages.rl",
          schema.RLConfig, checks.validate_rl,
          ("init_from", "rl.max_steps", "rl.prompts_per_step", "rl.num_generations", "rl.num_mini_batches",
           "rl.kl_coef", "rl.sampling.max_new_tokens", "optim.lr", "task.reward_fn", "seed", "resume")),
    Stage("eval", "pass@k, majority vote and entropy diagnostics for a checkpoint", "ntp_rl.stages.eval",
          schema.EvalConfig, checks.validate_eval,
          ("model.name_or_path", "eval.n", "eval.ks", "eval.num_problems", "sampling.temperature", "sampling.top_p",
           "sampling.max_new_tokens", "seed")),
    Stage("pipeline", "pretrain [-> midtrain] -> eval -> rl -> eval as one lineage; ntp-rl experiment=<name> runs a study",
          "ntp_rl.stages.pipeline", pipeline_schema.PipelineConfig, checks.validate_pipeline,
          ("stages", "loss.beta", "train.max_steps", "rl.max_steps", "eval.n", "seed", "objective")),
    Stage("prepare", "tokenize a corpus once into token shards that pretrain reads by position (data=prepared)",
          "ntp_rl.stages.prepare", schema.PrepareConfig, checks.validate_prepare,
          ("data.path", "data.tokenizer", "data.text_field", "data.val_docs", "prepare.out_dir", "prepare.workers",
           "prepare.docs_per_shard")),
    Stage("export", "a run's latest checkpoint as a Hugging Face model directory: ntp-rl export <run> [export.out_dir=DIR]",
          "ntp_rl.stages.export"),
    Stage("compare", "tables, tests and plots across finished runs: ntp-rl compare <dirs> [--out DIR] [--baseline SETTING]",
          "ntp_rl.stages.compare"),
)}


def run_stage(name: str, cfg: Any, overrides: Sequence[str] = ()) -> Any:
    """Dispatch a config nobody has checked yet (a pipeline's stages, tests): validate it once, then run."""
    STAGES[name].validate(cfg)
    return run_validated(name, cfg, overrides)


def run_validated(name: str, cfg: Any, overrides: Sequence[str] = ()) -> Any:
    """Run a config its caller validated (the CLI validates every job of a command before the first runs)."""
    from transformers.utils import logging as hf_logging

    from ntp_rl.rundir import claims_released

    hf_logging.disable_progress_bar()  # the stages draw their own; transformers' would interleave
    with claims_released():  # the run directory stays locked while the stage runs, and no longer
        return STAGES[name].run(cfg, overrides)
