"""`ntp-rl rl`'s sample and score phases: the step's groups (dynamic sampling over rounds, from an
engine that holds the policy's current weights), then advantages and this process's training rows."""

from __future__ import annotations

import functools
import itertools
import time
from typing import Any, Iterable

import torch

from ntp_rl import sharding
from ntp_rl.config.schema import GeneratorKind
from ntp_rl.engines import sampling_weights
from ntp_rl.rl.advantages import AdvantageInputs, compute_advantages
from ntp_rl.rl.rollout import (CollectedGroups, Group, RolloutBatch, build_batch, collect_groups, deal_groups,
                               sample_groups)
from ntp_rl.seeding import rollout_seed
from ntp_rl.stages.rl_state import RLState


def sample(state: RLState) -> tuple[CollectedGroups, float]:
    """The step's training groups (dynamic sampling over rounds), and the seconds it took."""
    rl = state.cfg.rl
    started = time.perf_counter()
    sync_engine(state)
    with sampling_weights(state.cfg.generator, state.model):
        collected = collect_groups(functools.partial(sample_round, state), rl.prompts_per_step, rl.dynamic_sampling,
                                   rl.max_sampling_rounds)
    state.rollouts.release_memory()  # vLLM's sleep mode on GPU: the trainer gets the memory back
    return collected, time.perf_counter() - started


def sync_engine(state: RLState) -> None:
    """The sampling engine takes the policy's current weights, if it has changed since the engine last did.

    With `generator=hf` the engine is the policy itself; a vLLM engine gets a copy (TRL once
    shipped a version that sampled from stale weights; here
    tests/test_vllm.py::test_rl_samples_with_the_policys_current_weights checks it).
    """
    if state.engine_stale:
        state.rollouts.sync_weights(functools.partial(policy_weights, state.session.accelerator, state.model))
        state.engine_stale = False


def policy_weights(accelerator: Any, model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """The policy's full weights under their Hugging Face names, on every process (each has an engine):
    its parameters and its saved buffers (an MoE router's `expert_bias`), as transformers holds them
    (fused experts); the engine's model maps them to its own.

    Under FSDP2 a lazy stream: each parameter is gathered from the shards as the engine reads it and
    dropped once read (sharding.whole_parameters), so no process holds a second copy of the model;
    otherwise every process already holds them.
    """
    if sharding.is_sharded(model):
        return itertools.chain(sharding.whole_parameters(model.lm), _saved_buffers(model.lm))
    return lm_weights(accelerator.unwrap_model(model).lm)


def lm_weights(lm: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """A model's parameters and saved buffers, as its checkpoint would name them (tied weights once)."""
    return itertools.chain(lm.named_parameters(), _saved_buffers(lm))


def _saved_buffers(module: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for prefix, sub in module.named_modules():
        for name, buffer in sub.named_buffers(recurse=False):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def sample_round(state: RLState, round_: int) -> list[Group]:
    """This process's share of one round's prompts, sampled, then every process's groups in global order."""
    from accelerate.utils import gather_object

    cfg, session = state.cfg, state.session
    offset = state.prompt_position + session.rank * state.per_rank
    problems = state.stream.take(offset, state.per_rank)
    prompts_per_call = rollout_prompts_per_call(cfg, len(problems))
    step = state.step
    groups = sample_groups(state.rollouts, state.task, state.tokenizer, problems, cfg.rl.num_generations, state.sampling,
                           prompts_per_call, lambda i: rollout_seed(cfg.seed, step, round_, offset + i),
                           cfg.task.format_reward)
    state.prompt_position += cfg.rl.prompts_per_step
    return gather_object(groups)


def rollout_prompts_per_call(cfg: Any, prompts: int) -> int:
    """rl.prompts_per_generate_call, else: hf a sequence count (rl.sampling.batch_size / G prompts), vllm all of them."""
    rl = cfg.rl
    if rl.prompts_per_generate_call is not None:
        return rl.prompts_per_generate_call
    if cfg.generator.name is GeneratorKind.vllm:
        return max(1, prompts)
    return max(1, rl.sampling.batch_size // rl.num_generations)


def score(state: RLState, collected: CollectedGroups) -> RolloutBatch:
    """This process's share of the step's groups: advantages within each group, one training row per sample."""
    rl, session = state.cfg.rl, state.session
    report_filled(state, collected)
    share = deal_groups(len(collected.groups), rl.num_mini_batches, session.world, session.rank)
    mine = [collected.groups[i] for i in share]
    trained = collected.trained(rl.dynamic_sampling)
    rewards = torch.tensor([g.rewards for g in mine], dtype=torch.float32)
    advantages = compute_advantages(AdvantageInputs(rewards), rl)
    return build_batch(mine, advantages, state.tokenizer.pad_token_id, rl.mask_truncated,
                       trained=[trained[i] for i in share]).to(session.device)


def report_filled(state: RLState, collected: CollectedGroups) -> None:
    """Count the steps that ran out of sampling rounds; say so the first time."""
    if not any(g.informative for g in collected.groups):
        state.equal_reward_steps += 1
    if not collected.filled:
        return
    if not state.short_steps:
        rl = state.cfg.rl
        state.session.say(f"  step {state.step}: {rl.max_sampling_rounds} sampling round(s) gave only "
                          f"{len(collected.groups) - collected.filled} of {rl.prompts_per_step} groups with different "
                          "rewards; the step trains on those alone (dynamic_sampling/filled_groups counts the rest)")
    state.short_steps += 1
    state.filled_groups += collected.filled
