"""`ntp-rl rl`'s log phase: the step's metrics, and the check that the sampling engine samples from the policy."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ntp_rl import moe
from ntp_rl.errors import UserError
from ntp_rl.metrics import Sums
from ntp_rl.models import count_parameters
from ntp_rl.rl.rollout import CollectedGroups, RolloutBatch
from ntp_rl.runtime import peak_flops, peak_memory_gib
from ntp_rl.stages.rl_state import RLState
from ntp_rl.stages.rl_update import UpdateCounts


def log(state: RLState, collected: CollectedGroups, batch: RolloutBatch, sums: Sums, counts: UpdateCounts,
        timing: dict[str, float], bar: Any) -> dict:
    """The step's metrics (TRL's names where it has them), logged every rl.log_every steps."""
    rl, session = state.cfg.rl, state.session
    sums.add(seq_tokens=batch.attention_mask.sum())
    totals = sums.totals(session.accelerator)
    metrics = rollout_metrics(collected)
    generated_tokens = metrics.pop("_gen_tokens")
    metrics |= {
        "empty_mini_batches": counts.empty,
        "nonfinite_skips": state.nonfinite_skips,
        "lr": state.scheduler.get_last_lr()[0],
        "perf/gen_tokens_per_sec": generated_tokens / max(timing["gen"], 1e-9),
        "perf/gen_time_s": timing["gen"],
        "perf/train_time_s": timing["train"],
        "perf/step_time_s": time.perf_counter() - timing["step_start"],
        "perf/peak_mem_gib": peak_memory_gib(session.device),
    }
    metrics |= throughput_metrics(state, totals["seq_tokens"], generated_tokens, timing["train"], metrics["perf/step_time_s"])
    metrics |= update_metrics(state, totals, counts)
    check_engine_gap(state, metrics)
    # An MoE policy's expert load over the step; its router biases stay as pre-training left them.
    metrics |= moe.after_step(state.lm, lambda t: session.accelerator.reduce(t, reduction="sum"), stepped=False)
    state.first_step_metrics = state.first_step_metrics or metrics
    if state.step % rl.log_every == 0 or state.step == rl.max_steps:
        session.tracker.log(metrics, step=state.step)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                        ent=f"{metrics.get('entropy', math.nan):.3f}", len=f"{metrics['completions/mean_length']:.1f}",
                        drop=metrics["dynamic_sampling/dropped_groups"],
                        **({"mfu": f"{metrics['perf/mfu']:.1%}"} if "perf/mfu" in metrics else {}))
    return metrics


# The mean engine/trainer log-prob gap that precision alone explains, by the engine's dtype (rl.max_logp_gap).
DEFAULT_MAX_LOGP_GAP = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


def check_engine_gap(state: RLState, metrics: dict[str, float]) -> None:
    """Stop the run when the engine's log-probs of its own samples are far from the trainer's: it samples
    from another model than the one trained, and every update would be off-policy without a word."""
    gap = metrics.get("sampling/sampling_logp_difference/mean")
    if gap is None or state.sampling.top_p < 1:  # top-p renormalises the engine's numbers: a gap by design
        return
    dtype = getattr(getattr(state.rollouts, "config", None), "dtype", None)
    limit = state.cfg.rl.max_logp_gap or DEFAULT_MAX_LOGP_GAP.get(dtype, 0.1)
    if gap > limit:
        raise UserError(f"rl step {state.step}: the vLLM engine's log-probs of its samples are {gap:.3g} nats from the "
                        f"trainer's on average (max {metrics['sampling/sampling_logp_difference/max']:.3g}), beyond the "
                        f"{limit:g} that a {dtype} engine explains: it is not sampling from the policy (weights that did "
                        "not reach it, or a model vLLM computes differently, such as an unsupported MoE routing); "
                        "rl.max_logp_gap sets the limit")


def update_metrics(state: RLState, totals: dict[str, float], counts: UpdateCounts) -> dict[str, float]:
    """Means over the tokens trained on and the updates taken; a step without any has none to report
    (a 0 would read as a measurement)."""
    metrics = {}
    if totals["tokens"]:
        metrics["entropy"] = totals["entropy"] / totals["tokens"]
    if totals["clip_tokens"]:
        metrics["clip_ratio/low_mean"] = totals["clip_low"] / totals["clip_tokens"]
        metrics["clip_ratio/high_mean"] = totals["clip_high"] / totals["clip_tokens"]
        if state.reference is not None:
            metrics["kl"] = totals["kl"] / totals["clip_tokens"]
    if totals["logp_diff_tokens"]:  # TRL's names for the train/rollout mismatch
        metrics["sampling/sampling_logp_difference/mean"] = totals["logp_diff"] / totals["logp_diff_tokens"]
        metrics["sampling/sampling_logp_difference/max"] = totals["logp_diff_max"]
        if state.cfg.rl.tis_cap is not None and totals["clip_tokens"]:
            metrics["sampling/importance_sampling_ratio/mean"] = totals["is_ratio"] / totals["clip_tokens"]
            metrics["sampling/importance_sampling_ratio/max"] = totals["is_ratio_max"]
            metrics["sampling/importance_sampling_ratio/clipped_frac"] = totals["is_clipped"] / totals["clip_tokens"]
    if totals["micro_slots"]:  # the padding the update's forwards carried
        metrics["perf/useful_token_share"] = totals["micro_tokens"] / totals["micro_slots"]
    if counts.applied:
        metrics["policy_loss"] = totals["loss"] / counts.applied
        # every process holds the same (global) norm
        metrics["grad_norm"] = totals["grad_norm"] / state.session.world / counts.applied
    return metrics


def throughput_metrics(state: RLState, seq_tokens: float, generated_tokens: float, train_time: float,
                       step_time: float) -> dict[str, float]:
    """Training tokens/s, and MFU where the GPU's peak is known.

    Model FLOPs: forward+backward (6N a token) per pass over the batch, a forward (2N) for each
    extra no-grad pass and for every sampled token (the attention term left out).
    """
    rl = state.cfg.rl
    trained = seq_tokens * rl.num_iterations
    metrics = {"perf/train_tokens_per_sec": trained / max(train_time, 1e-9)}
    peak = peak_flops(state.session.device)
    if peak:
        n_params = count_parameters(state.lm, exclude_embeddings=True, active=True)
        extra_forwards = seq_tokens * (int(state.separate_old_pass) + int(state.reference is not None))
        flops = 6 * n_params * trained + 2 * n_params * (extra_forwards + generated_tokens)
        metrics["perf/mfu"] = flops / step_time / (peak * state.session.world)
    return metrics


def rollout_metrics(collected: CollectedGroups) -> dict[str, float]:
    """Rewards and lengths of everything sampled this step (every round, every process)."""
    groups = collected.generated
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    lengths = torch.tensor([len(r) for g in groups for r in g.responses], dtype=torch.float64)
    truncated = [t for g in groups for t in g.truncated]
    return {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std(dim=1).mean().item(),  # within groups, as TRL reports it
        "accuracy": sum(c for g in groups for c in g.correct) / rewards.numel(),
        "frac_reward_zero_std": sum(not g.informative for g in groups) / len(groups),
        "dynamic_sampling/dropped_groups": collected.dropped,
        "dynamic_sampling/filled_groups": collected.filled,
        "dynamic_sampling/rounds": collected.rounds,
        "completions/mean_length": lengths.mean().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": sum(truncated) / len(truncated),
        "_gen_tokens": lengths.sum().item(),
    }
