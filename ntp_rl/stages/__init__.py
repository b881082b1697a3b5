"""The stage table: every stage declared once, read by the CLI, the pipeline and the docs.

A stage with a schema is configured by Hydra (`ntp-rl <stage> key=value ...`); its
`validate` runs once when it is dispatched, and its module's `run(cfg, overrides)` reads top
to bottom as named phases. A stage without a schema (compare) takes plain arguments.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from ntp_rl.config import schema
from ntp_rl.config import validate as checks


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str  # one line of `ntp-rl --help`
    module: str  # run(cfg, overrides) for a configured stage, main(argv) for one with plain arguments
    schema: Optional[type] = None  # the dataclass its YAML (conf/<name>.yaml) is merged into
    validate: Optional[Callable[[Any], None]] = None  # every check that needs the config alone

    def run(self, cfg: Any, overrides: Sequence[str] = ()) -> Any:
        return importlib.import_module(self.module).run(cfg, overrides=list(overrides))

    def main(self, argv: Sequence[str]) -> Any:
        return importlib.import_module(self.module).main(list(argv))


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("pretrain", "pre-train a model with the reward-shaped next-token loss", "ntp_rl.stages.pretrain",
          schema.PretrainConfig, checks.validate_pretrain),
    Stage("rl", "GRPO with verifiable rewards from a pre-trained checkpoint", "ntp_rl.stages.rl",
          schema.RLConfig, checks.validate_rl),
    Stage("eval", "pass@k, majority vote and entropy diagnostics for a checkpoint", "ntp_rl.stages.eval",
          schema.EvalConfig, checks.validate_eval),
    Stage("pipeline", "pretrain -> eval -> rl -> eval as one lineage; ntp-rl experiment=<name> runs a study",
          "ntp_rl.stages.pipeline", schema.PipelineConfig, checks.validate_pipeline),
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

    from ntp_rl.config.compose import loss_name
    from ntp_rl.rundir import claims_released

    if "loss" in cfg:  # the name shown and recorded follows the numbers, whatever preset they started from
        cfg.loss.name = loss_name(cfg.loss)
    hf_logging.disable_progress_bar()  # the stages draw their own; transformers' would interleave
    with claims_released():  # the run directory stays locked while the stage runs, and no longer
        return STAGES[name].run(cfg, overrides)
