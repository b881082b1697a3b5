"""The configured sampling engine (`generator=hf|vllm`). Apart from ntp_rl/generation.py because
ntp_rl/vllm_engine.py builds on generation's types: the choice sits above both, so neither imports
the other back."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Sequence

from ntp_rl import sharding
from ntp_rl.config.schema import GeneratorKind
from ntp_rl.generation import Generator, HFGenerator


def make_generator(generator_cfg: Any, model: Any, tokenizer: Any, stop_strings: Sequence[str], batch_size: int,
                   model_path: str, session: Any = None) -> Generator:
    """The configured engine: `model` itself (hf, `batch_size` sequences per generate call), or a vLLM
    engine started from the checkpoint in `model_path` (vllm, which batches by itself). With the stage's
    `session`, the engine computes in the stage's precision unless generator.vllm.dtype says otherwise
    (recorded in run.json), and vLLM's own output goes to the run directory's vllm.log."""
    if generator_cfg.name is GeneratorKind.vllm:
        from ntp_rl.vllm_engine import VLLMGenerator, sleeps

        if session is None:
            return VLLMGenerator(model_path, tokenizer, stop_strings, engine_settings(generator_cfg, "no"))
        settings = engine_settings(generator_cfg, session.accelerator.mixed_precision)
        if session.is_main:
            session.run_dir.update(generator={"name": "vllm", "dtype": settings.dtype,
                                              "sleep_mode": sleeps(settings)})
        log = session.run_dir.path / ("vllm.log" if session.rank == 0 else f"vllm.rank{session.rank}.log")
        return VLLMGenerator(model_path, tokenizer, stop_strings, settings, log_file=log, say=session.say)
    return HFGenerator(model, tokenizer, stop_strings, batch_size=batch_size)


def sampling_weights(generator_cfg: Any, model: Any) -> ContextManager[None]:
    """The context sampling runs in: generator=hf samples with the model itself, whose FSDP units are
    gathered for it (sharding.full_weights); a vLLM engine samples with its own copy, so nothing is."""
    if generator_cfg.name is GeneratorKind.vllm:
        return contextlib.nullcontext()
    return sharding.full_weights(model)


def sequences_per_call(generator_cfg: Any, batch_size: int, n: int, problems: int, world: int) -> int:
    """Sequences one generate call of an evaluation takes (n samples of `problems` problems over `world`
    processes): generator=hf `batch_size`, from as many problems as fit; generator=vllm each process's
    whole share in one call (the last process's may be smaller), its scheduler batching it by sequences
    and KV-cache memory."""
    if generator_cfg.name is GeneratorKind.vllm:
        return -(-problems // world) * n
    return batch_size


def engine_settings(generator_cfg: Any, mixed_precision: str) -> Any:
    """generator.vllm with its dtype decided: unset, the trainer's (vLLM's "auto" would sample an fp32
    checkpoint in bf16 while the trainer scores it in fp32: a log-prob gap of ~0.1 nats at worst)."""
    import dataclasses

    from omegaconf import OmegaConf

    settings = generator_cfg.vllm
    if OmegaConf.is_config(settings):
        settings = OmegaConf.to_object(settings)
    if settings.dtype is None:
        settings = dataclasses.replace(settings, dtype="bfloat16" if mixed_precision == "bf16" else "float32")
    return settings
