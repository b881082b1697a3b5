"""`ntp-rl rl`'s old log-probs and update phases: the rollout policy's and the reference's log-probs,
then the clipped-surrogate updates, mini-batch by mini-batch, each over micro-batches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ntp_rl.config.schema import NonFinitePolicy
from ntp_rl.metrics import Sums
from ntp_rl.rl.policy_loss import POLICY_LOSSES, PolicyLossInputs, aggregate, aggregation_count, k3_kl
from ntp_rl.rl.rollout import RolloutBatch, plan_micro_batches, split_plan, token_logprobs
from ntp_rl.stages.rl_state import RLState

# Per-step sums (and maxima) over micro-batches, reduced over processes in one call.
STEP_SUMS = ("loss", "entropy", "tokens", "clip_low", "clip_high", "clip_tokens", "kl", "grad_norm", "seq_tokens",
             "logp_diff", "logp_diff_tokens", "is_ratio", "is_clipped", "micro_tokens", "micro_slots")
STEP_MAXIMA = ("logp_diff_max", "is_ratio_max")


@torch.no_grad()
def old_logprobs(state: RLState, batch: RolloutBatch, sums: Sums) -> None:
    """Log-probs of the rollout policy (when several updates follow) and of the reference (when KL is on)."""
    if not state.separate_old_pass and state.reference is None:
        return
    blank = lambda: torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.input_ids.device)  # noqa: E731
    old = blank() if state.separate_old_pass else None
    ref = blank() if state.reference is not None else None
    for rows, micro in micro_batches(state, batch):
        width = micro.response_mask.shape[1]  # a micro-batch is trimmed to its longest row
        if old is not None:
            logp, entropy = token_logprobs(state.model, micro, state.sampling.temperature, with_entropy=True)
            old[rows, :width] = logp
            sums.add(entropy=(entropy * micro.response_mask).sum(), tokens=micro.response_mask.sum())
            measure_mismatch(sums, logp, micro)
        if ref is not None:
            with state.session.accelerator.autocast():  # the reference is not prepared, so not autocast by Accelerate
                ref[rows, :width] = token_logprobs(state.reference, micro, state.sampling.temperature)[0]
    batch.old_logp, batch.ref_logp = old, ref


def micro_batches(state: RLState, batch: RolloutBatch) -> list[tuple[list[int], RolloutBatch]]:
    """The batch's rows in micro-batches (rl.micro_batch_size rows, or rl.max_tokens_per_micro_batch
    padded tokens), as the same number of micro-batches on every process; each with its rows' indices."""
    rl, accelerator = state.cfg.rl, state.session.accelerator
    plan = plan_micro_batches(batch.lengths(), rl.micro_batch_size, rl.max_tokens_per_micro_batch)
    if state.session.world > 1:
        most = accelerator.gather(torch.tensor([len(plan)], device=state.session.device)).max().item()
        plan = split_plan(plan, int(most))
    return [(rows, batch.select(rows)) for rows in plan]


@dataclass
class UpdateCounts:
    """What became of a step's mini-batch updates (the same on every process)."""

    applied: int = 0
    empty: int = 0  # no response token of the global mini-batch had a loss: nothing to learn, no update
    nonfinite: int = 0  # a non-finite gradient, skipped under rl.on_nonfinite=skip


def update(state: RLState, batch: RolloutBatch, sums: Sums, bar: Any) -> UpdateCounts:
    """mu passes over the batch, one optimizer update per mini-batch; then the schedule's step."""
    rl = state.cfg.rl
    rows_per_update = state.per_rank // rl.num_mini_batches * rl.num_generations
    counts = UpdateCounts()
    for _ in range(rl.num_iterations):
        for first in range(0, len(batch), rows_per_update):
            minibatch_sums = Sums(STEP_SUMS, device=state.session.device, maxima=STEP_MAXIMA)
            if not update_minibatch(state, batch.rows(first, first + rows_per_update), minibatch_sums):
                # An optimizer step on a zero gradient would still move the weights (Adam's
                # momentum, weight decay), so an empty mini-batch takes no step at all.
                counts.empty += 1
                continue
            grad_norm = state.session.accelerator.clip_grad_norm_(state.model.parameters(), state.cfg.optim.grad_clip)
            # The norm is of the gradient averaged over processes, so every process decides alike.
            if torch.isfinite(grad_norm):
                minibatch_sums.add(grad_norm=grad_norm.detach())
                sums.merge(minibatch_sums)
                state.optimizer.step()
                state.engine_stale = True
                counts.applied += 1
            else:
                skip_nonfinite(state, minibatch_sums["loss"], grad_norm, bar)
                counts.nonfinite += 1
            state.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # torch warns when no update preceded: true of an empty step, and meant
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        state.scheduler.step()
    report_empty(state, counts)
    return counts


def skip_nonfinite(state: RLState, loss: torch.Tensor, grad_norm: torch.Tensor, bar: Any) -> None:
    """A non-finite gradient stops the run (rl.on_nonfinite=stop), or its update is dropped and counted."""
    rl = state.cfg.rl
    state.nonfinite_skips += 1
    if rl.on_nonfinite is NonFinitePolicy.stop or state.nonfinite_skips > rl.max_nonfinite_skips:
        state.session.stop_diverged(state.step, loss, grad_norm, bar)
    state.session.say(f"  step {state.step}: non-finite loss or gradient, mini-batch update skipped "
                      f"({state.nonfinite_skips} so far, at most rl.max_nonfinite_skips={rl.max_nonfinite_skips})")


def report_empty(state: RLState, counts: UpdateCounts) -> None:
    """Say the first time a step had nothing to train on; the metric and results.json count every time."""
    if counts.empty and not state.empty_mini_batches:
        state.session.say(f"  step {state.step}: {counts.empty} of {counts.empty + counts.applied} mini-batch "
                          "update(s) had no response token with a loss (all truncated under rl.mask_truncated=true, "
                          "or only equal-reward groups) and were skipped; counted in empty_mini_batches")
    state.empty_mini_batches += counts.empty


def update_minibatch(state: RLState, minibatch: RolloutBatch, sums: Sums) -> bool:
    """Gradients of one mini-batch's clipped surrogate, micro-batch by micro-batch; False if it has no token to train on."""
    rl, accelerator, world = state.cfg.rl, state.session.accelerator, state.session.world
    policy_loss = POLICY_LOSSES[rl.policy_loss]
    # Normalise by the whole global mini-batch: each process's loss is its share of the global average.
    count = accelerator.reduce(aggregation_count(minibatch.response_mask, rl.loss_aggregation), "sum")
    if count.item() == 0:  # every process sees the same global count, so all skip together
        return False
    micros = [micro for _, micro in micro_batches(state, minibatch)]
    for i, micro in enumerate(micros):
        # Gradients are averaged over processes only on the last micro-batch.
        with state.session.gradient_sync(state.model, sync=i == len(micros) - 1):
            logp, entropy = token_logprobs(state.model, micro, state.sampling.temperature,
                                           with_entropy=not state.separate_old_pass)
            old_logp = micro.old_logp if state.separate_old_pass else logp.detach()
            if not state.separate_old_pass:  # this single update's pass is the step's only look at the rollout policy
                measure_mismatch(sums, old_logp, micro)
            out = policy_loss(PolicyLossInputs(logp, old_logp, micro.advantages), rl)
            per_token = out.loss
            if rl.tis_cap is not None and micro.rollout_logp is not None:
                per_token = per_token * truncated_importance_weights(sums, old_logp, micro, rl.tis_cap)
            if state.reference is not None:
                kl = k3_kl(logp, micro.ref_logp)
                per_token = per_token + rl.kl_coef * kl
            loss = aggregate(per_token, micro.response_mask, rl.loss_aggregation, count)
            # DDP and FSDP average gradients over processes; the loss is already a share of the
            # global average, so undo the division.
            accelerator.backward(loss * world)
        mask = micro.response_mask
        sums.add(micro_tokens=micro.attention_mask.sum(), micro_slots=micro.attention_mask.numel())
        sums.add(loss=loss.detach(), clip_low=(out.low_clipped & mask).sum(),
                 clip_high=(out.high_clipped & mask).sum(), clip_tokens=mask.sum(),
                 kl=(kl.detach() * mask).sum() if state.reference is not None else 0.0)
        if entropy is not None:
            sums.add(entropy=(entropy * mask).sum(), tokens=mask.sum())
    return True


def measure_mismatch(sums: Sums, trainer_logp: torch.Tensor, micro: RolloutBatch) -> None:
    """How far the sampling engine's log-probs of the sampled tokens are from the trainer's, under the
    same weights (bf16 kernels, batching and top-p renormalisation make them differ); vLLM only."""
    if micro.rollout_logp is None:
        return
    mask = micro.response_mask
    diff = (trainer_logp.detach() - micro.rollout_logp).abs()[mask]
    if diff.numel():
        sums.add(logp_diff=diff.sum(), logp_diff_tokens=diff.numel())
        sums.maximum(logp_diff_max=diff.max())


def truncated_importance_weights(sums: Sums, old_logp: torch.Tensor, micro: RolloutBatch, cap: float) -> torch.Tensor:
    """min(pi_trainer / pi_engine, cap) per token (truncated importance sampling, as verl's and TRL's):
    the samples came from the engine's distribution, the loss assumes the trainer's."""
    log_ratio = (old_logp.detach() - micro.rollout_logp).clamp(max=20.0)  # exp() of more overflows and is capped anyway
    ratio = log_ratio.exp()
    mask = micro.response_mask
    if mask.any():
        sums.add(is_ratio=ratio.clamp(max=cap)[mask].sum(), is_clipped=(ratio[mask] > cap).sum())
        sums.maximum(is_ratio_max=ratio[mask].max())
    return ratio.clamp(max=cap)
