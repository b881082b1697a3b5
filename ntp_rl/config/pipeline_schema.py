"""The pipeline's config: a lineage of stages (pretrain [-> midtrain] -> eval -> rl -> eval) in one run.

Its sections are the stages' own, from schema.py; only what the lineage adds is here. It
imports schema.py alone, which stays a leaf.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ntp_rl.config.schema import (DiagnosticsConfig, EvalSettings, GeneratorConfig, GRPOConfig, OptimConfig,
                                  PretrainConfig, SamplingConfig, TaskConfig)


# A pipeline lineage's stages, in order: each runs one of the stages in the stage table
# (eval_base and eval_rl are `eval` runs, before and after RL). midtrain is there when asked for.
LINEAGE_STAGES = ("pretrain", "midtrain", "eval_base", "rl", "eval_rl")
DEFAULT_LINEAGE = [stage for stage in LINEAGE_STAGES if stage != "midtrain"]


@dataclass
class MidtrainSettings:
    """A pipeline's midtrain stage: what changes from pre-training (the rest is the pre-training's)."""

    rope_theta: float = 1.0e6  # the paper: 1e4 -> 1e6
    seq_len: int = 512  # the paper: 4096 -> 16384; here twice the tiny pre-training's
    max_steps: int = 100
    # A loss preset (conf/loss/<name>.yaml) for mid-training alone; unset, mid-training keeps the pipeline's
    # loss (the paper does). A fine-tuning loss such as dft, which cannot pre-train from scratch, goes here.
    loss: Optional[str] = None


@dataclass
class PipelineConfig(PretrainConfig):
    """pretrain [-> midtrain] -> eval (base) -> rl -> eval (after RL). The pre-training keys sit at the top
    level as in `ntp-rl pretrain` (loss=..., train.max_steps=...); the RL and eval keys are
    those of `ntp-rl rl` and `ntp-rl eval` (rl.*, eval.*, sampling.*), with RL's optimizer
    under rl_optim."""

    stage: str = "pipeline"
    # A subset of LINEAGE_STAGES, in that order; add midtrain: [pretrain,midtrain,eval_base,rl,eval_rl]
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_LINEAGE))
    midtrain: MidtrainSettings = field(default_factory=MidtrainSettings)
    midtrain_optim: OptimConfig = field(default_factory=OptimConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    rl_optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # the evals' sampling
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)  # rl's and the evals' sampling engine
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    # What a search (hydra/sweeper=search) optimises: a key of the lineage's summary --
    # rl_pass@<k>, rl_avg@<n>, rl_cons@<n> (after RL), base_* (before RL), pretrain_nll.
    objective: str = "rl_pass@1"
    # Pre-registered hypotheses that a sweep's closing `compare` judges (verdicts.md): a YAML file,
    # or the name of one shipped in conf/preregistered/ (experiment=rl_study sets its own).
    hypotheses: Optional[str] = None
