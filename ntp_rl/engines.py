"""The configured sampling engine (`generator=hf|vllm`). Apart from ntp_rl/generation.py because
ntp_rl/vllm_engine.py builds on generation's types: the choice sits above both, so neither imports
the other back."""

from __future__ import annotations

from typing import Any, Sequence

from ntp_rl.config.schema import GeneratorKind
from ntp_rl.generation import Generator, HFGenerator


def make_generator(generator_cfg: Any, model: Any, tokenizer: Any, stop_strings: Sequence[str], batch_size: int,
                   model_path: str) -> Generator:
    """The configured engine: `model` itself (hf, `batch_size` sequences per generate call), or a vLLM
    engine started from the checkpoint in `model_path` (vllm, which batches by itself)."""
    if generator_cfg.name is GeneratorKind.vllm:
        from omegaconf import OmegaConf

        from ntp_rl.vllm_engine import VLLMGenerator

        settings = generator_cfg.vllm
        if OmegaConf.is_config(settings):
            settings = OmegaConf.to_object(settings)
        return VLLMGenerator(model_path, tokenizer, stop_strings, settings)
    return HFGenerator(model, tokenizer, stop_strings, batch_size=batch_size)
