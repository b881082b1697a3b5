"""The stages. Each is one module with `run(cfg, overrides)` that reads top to bottom as a loop."""

from __future__ import annotations

import importlib
from typing import Any, Sequence

from omegaconf import OmegaConf

from ntp_rl.errors import ConfigError


def check_stage_config(stage: str, cfg: Any) -> None:
    """Everything that can be checked from the config alone, before any work starts."""
    from ntp_rl import config

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "is required (set it on the command line)")
    getattr(config, f"check_{stage}")(cfg)


def run_stage(stage: str, cfg: Any, overrides: Sequence[str] = ()) -> Any:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the stages draw their own; transformers' would interleave
    check_stage_config(stage, cfg)
    module = importlib.import_module(f"ntp_rl.stages.{stage}")
    return module.run(cfg, overrides=list(overrides))
