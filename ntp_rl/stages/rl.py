"""`ntp-rl rl`: on-policy GRPO with verifiable rewards (DAPO's clip-higher and dynamic sampling).

Top to bottom: load the task and the policy, then each step runs five phases.
  sample         every process samples G completions for its share of the step's prompts;
                 the groups of all processes are gathered, so all agree on which groups carry
                 signal (dynamic sampling) and each takes its share of the kept ones;
  score          group-relative advantages, one training row per sample;
  old log-probs  the rollout policy's (and the reference's) log-probs, when an update needs them;
  update         mu x mini-batch clipped-surrogate updates; the loss is averaged over the
                 response tokens of the global batch, so any number of processes makes the same update;
  log            rewards, lengths, clipping, entropy, throughput.
A held-out evaluation runs before training, every rl.eval_every steps and at the end.

Rollouts are seeded by (run seed, step, round, prompt position) and the prompt position is
saved in each checkpoint, so `resume=auto` reproduces the run from its last checkpoint.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from ntp_rl import checkpoint as ckpt
from ntp_rl import moe, stopping
from ntp_rl.config.schema import GeneratorKind, NonFinitePolicy
from ntp_rl.config.validate import rl_prompt_split
from ntp_rl.data.tokenizer import load_tokenizer
from ntp_rl.engines import make_generator
from ntp_rl.errors import UserError
from ntp_rl.evaluation import sample_and_score_chunks, summarize
from ntp_rl.faults import kill_point
from ntp_rl.generation import Generator, Sampling
from ntp_rl.metrics import Sums
from ntp_rl.models import check_vocab, count_parameters, enable_activation_checkpointing, load_pretrained
from ntp_rl.optim import build_adamw, lr_lambda
from ntp_rl.rl.advantages import AdvantageInputs, compute_advantages
from ntp_rl.rl.policy_loss import POLICY_LOSSES, PolicyLossInputs, aggregate, aggregation_count, k3_kl
from ntp_rl.rl.rollout import (CollectedGroups, Group, PolicyLogprobs, PromptStream, RolloutBatch, build_batch,
                               collect_groups, deal_groups, plan_micro_batches, sample_groups, split_plan,
                               token_logprobs)
from ntp_rl.runtime import peak_flops, peak_memory_gib
from ntp_rl.seeding import rl_eval_seed, rollout_seed, seed_everything
from ntp_rl.rundir import shown_path
from ntp_rl.stages.session import StageSession
from ntp_rl.tasks import Task, TaskProblem, build_task

# Per-step sums (and maxima) over micro-batches, reduced over processes in one call.
STEP_SUMS = ("loss", "entropy", "tokens", "clip_low", "clip_high", "clip_tokens", "kl", "grad_norm", "seq_tokens",
             "logp_diff", "logp_diff_tokens", "is_ratio", "is_clipped", "micro_tokens", "micro_slots")
STEP_MAXIMA = ("logp_diff_max", "is_ratio_max")


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    session = StageSession("rl", cfg, overrides, precision=cfg.rl.precision)
    rl_prompt_split(cfg.rl, session.world)
    seed_everything(cfg.seed)

    # Everything a user can get wrong is found before the run directory exists.
    task = build_task(cfg.task)
    train_pool = task.problems("train", cfg.rl.train_problems)
    eval_problems = task.problems("test", cfg.rl.eval_problems)
    init_dir = ckpt.resolve_init_from(cfg.init_from)
    session.note_unread_answers(task)
    session.note_source_run("init_from", cfg.init_from, init_dir)
    session.choose_run_dir()
    if (done := session.finished_results(cfg.rl.max_steps)) is not None:
        return done
    policy, tokenizer, reference, model_dir = load_models(cfg, session, init_dir)

    # SIGTERM: a checkpoint at the end of the step, then the run stops
    with session.open(resume_step=session.resume_step()), stopping.checkpointing():
        state = setup(cfg, session, task, policy, tokenizer, reference, train_pool, eval_problems, model_dir)
        announce(state, init_dir)
        eval_after = None
        if state.step == 0:
            eval_after = state.eval_before = evaluate_held_out(state, 0)
        bar = session.progress(total=cfg.rl.max_steps, initial=state.step, logs=True)
        last_step_metrics: dict = {}
        started = time.perf_counter()
        while state.step < cfg.rl.max_steps:
            step_start = time.perf_counter()
            state.step += 1
            collected, gen_time = sample(state)
            batch = score(state, collected)
            train_start = time.perf_counter()
            sums = Sums(STEP_SUMS, device=session.device, maxima=STEP_MAXIMA)
            old_logprobs(state, batch, sums)
            counts = update(state, batch, sums, bar)
            bar.update(1)
            kill_point("step", state.step)
            timing = {"gen": gen_time, "train": time.perf_counter() - train_start, "step_start": step_start}
            last_step_metrics = log(state, collected, batch, sums, counts, timing, bar)
            if state.step % cfg.rl.eval_every == 0 or state.step == cfg.rl.max_steps:
                eval_after = evaluate_held_out(state, state.step)
            saved = state.step % cfg.rl.save_every == 0 or state.step == cfg.rl.max_steps
            if saved:
                save(state)
            stopping.stop_if_asked(session.accelerator, lambda: saved or save(state))
        bar.close()
        if eval_after is None:  # resumed from the final checkpoint of a run that died before finishing
            eval_after = evaluate_held_out(state, state.step)
        return finish(state, init_dir, eval_after, last_step_metrics, time.perf_counter() - started)


@dataclass
class RLState:
    """The run's models and settings, and where it is: what every phase reads and updates."""

    cfg: Any
    session: StageSession
    task: Task
    tokenizer: Any
    model: torch.nn.Module  # PolicyLogprobs around the policy, prepared by Accelerate
    lm: torch.nn.Module  # the policy itself, a Hugging Face model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: Optional[torch.nn.Module]  # PolicyLogprobs around frozen init_from weights for the KL term, or None
    stream: PromptStream  # the train prompts, in a reshuffled order that depends on position only
    eval_problems: list[TaskProblem]
    rollouts: Generator  # rl's sampling engine (`generator`), for rollouts and held-out checks
    sampling: Sampling
    eval_sampling: Sampling
    per_rank: int  # prompts (= groups) each process samples and trains on per step
    model_dir: str  # the checkpoint (or hub name) the policy was loaded from: where a vLLM engine starts
    step: int = 0
    prompt_position: int = 0  # prompts taken from the stream so far, over all processes
    eval_before: Optional[dict] = None
    first_step_metrics: Optional[dict] = None
    empty_mini_batches: int = 0  # over the run: updates skipped because no response token had a loss
    nonfinite_skips: int = 0  # over the run: updates dropped for a non-finite gradient (rl.on_nonfinite=skip)
    short_steps: int = 0  # over the run: steps whose sampling rounds ran out before the batch was full
    equal_reward_steps: int = 0  # over the run: steps in which every group had equal rewards (nothing to learn)
    filled_groups: int = 0  # over the run: batch places those steps left without a group to train on
    engine_stale: bool = False  # the policy has changed since the sampling engine last took its weights

    @property
    def updates_per_step(self) -> int:
        return self.cfg.rl.num_iterations * self.cfg.rl.num_mini_batches

    @property
    def separate_old_pass(self) -> bool:
        # With a single update the policy that sampled is the one being updated: its log-probs
        # are the current ones, detached, and need no pass of their own.
        return self.updates_per_step > 1


# ---------------------------------------------------------------------------
# Setup


def load_models(cfg: Any, session: StageSession, init_dir: Any) -> tuple[torch.nn.Module, Any, Optional[torch.nn.Module], str]:
    """The policy (from the checkpoint being resumed, else init_from), its tokenizer, the KL reference,
    and the directory (or hub name) the policy came from."""
    resume_from = session.resume_from
    model_dir = str(resume_from or init_dir)
    policy = load_pretrained(model_dir, key="resume" if resume_from else "init_from")
    tokenizer = load_tokenizer(model_dir)
    check_vocab(policy, tokenizer)
    reference = None
    if cfg.rl.kl_coef > 0:  # frozen init_from weights, for the KL penalty
        reference = load_pretrained(str(init_dir), key="init_from").to(session.device).eval().requires_grad_(False)
        reference = PolicyLogprobs(reference, cfg.rl.logprob_chunk_size)
    return policy, tokenizer, reference, model_dir


def setup(cfg: Any, session: StageSession, task: Task, policy: torch.nn.Module, tokenizer: Any,
          reference: Optional[torch.nn.Module], train_pool: list[TaskProblem], eval_problems: list[TaskProblem],
          model_dir: str) -> RLState:
    rl = cfg.rl
    if rl.gradient_checkpointing:
        # the hf generator switches to eval mode for sampling, where the KV cache is needed
        enable_activation_checkpointing(policy)
    optimizer = build_adamw(policy, cfg.optim, fused=torch.cuda.is_available())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, rl.max_steps))
    model, optimizer = session.accelerator.prepare(PolicyLogprobs(policy, rl.logprob_chunk_size), optimizer)
    lm = session.accelerator.unwrap_model(model).lm
    state = RLState(
        cfg=cfg, session=session, task=task, tokenizer=tokenizer, model=model, lm=lm, optimizer=optimizer,
        scheduler=scheduler, reference=reference, stream=PromptStream(train_pool, cfg.seed), eval_problems=eval_problems,
        # A vLLM engine starts from the policy's own checkpoint, so it holds the policy's weights until the first update.
        rollouts=make_generator(cfg.generator, lm, tokenizer, task.stop_strings, rl.sampling.batch_size, model_dir,
                                session),
        sampling=Sampling(rl.sampling.temperature, rl.sampling.top_p, rl.sampling.max_new_tokens),
        eval_sampling=Sampling(rl.eval_sampling.temperature, rl.eval_sampling.top_p, rl.eval_sampling.max_new_tokens),
        per_rank=rl.prompts_per_step // session.world, model_dir=model_dir,
    )
    if session.resume_from is not None:
        saved = ckpt.load_training_state(session.resume_from, session.accelerator, model, optimizer)
        scheduler.load_state_dict(saved["scheduler"])
        state.step, state.prompt_position = int(saved["step"]), int(saved["prompt_position"])
        state.eval_before, state.first_step_metrics = saved.get("eval_before"), saved.get("train_first_step")
        state.empty_mini_batches = int(saved.get("empty_mini_batches", 0))
        state.nonfinite_skips = int(saved.get("nonfinite_skips", 0))
        state.short_steps, state.filled_groups = int(saved.get("short_steps", 0)), int(saved.get("filled_groups", 0))
        state.equal_reward_steps = int(saved.get("equal_reward_steps", 0))
    return state


def announce(state: RLState, init_dir: Any) -> None:
    rl, session = state.cfg.rl, state.session
    session.say(f"ntp-rl rl -> {shown_path(session.run_dir.path)}")
    session.say(f"  policy: {init_dir} ({count_parameters(state.lm) / 1e6:.2f}M params) | task: {state.task.name}, "
                f"{len(state.stream.problems)} train prompts, {len(state.eval_problems)} held-out problems")
    session.say(f"  GRPO: {rl.prompts_per_step} prompts x G={rl.num_generations} per step, {state.updates_per_step} "
                f"update(s) per step, clip [{1 - rl.clip_eps_low:g}, {1 + rl.clip_eps_high:g}], "
                f"{rl.loss_aggregation.value}, kl_coef {rl.kl_coef:g}, "
                f"dynamic sampling {'on' if rl.dynamic_sampling else 'off'} | {session.world} process(es), "
                f"{session.device.type}")
    if not session.accelerator.unwrap_model(state.model).chunked:
        session.say("  log-probs: the LM head is not a plain linear map (a bias, soft-cap or logit scale), so full "
                    "logits are materialised: memory grows with response tokens x vocabulary")
    if state.step:
        session.say(f"  resumed from {session.resume_from} at step {state.step}")


# ---------------------------------------------------------------------------
# The phases of a step


def sample(state: RLState) -> tuple[CollectedGroups, float]:
    """The step's training groups (dynamic sampling over rounds), and the seconds it took."""
    rl = state.cfg.rl
    started = time.perf_counter()
    sync_engine(state)
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

    Under FSDP each process gathers the full parameters for the copy (this path has not run on
    GPUs yet); otherwise every process already holds them.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                  FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
            return [(name.removeprefix("lm."), value) for name, value in model.state_dict().items()]
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
        with nullcontext() if i == len(micros) - 1 else accelerator.no_sync(state.model):
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
            # DDP averages gradients over processes; the loss is already a share of the
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


# ---------------------------------------------------------------------------
# Held-out checks, checkpoints, results


def evaluate_held_out(state: RLState, step: int) -> dict[str, float]:
    """Avg@n, Cons@n and pass@k on the task's test problems, logged at `step`.

    The problems are sampled in chunks of one generate call, each with a seed of its own that
    is the same at every evaluation: changes between evaluations come from the model, not the
    dice, and the numbers are the same for any number of processes (as in `ntp-rl eval`).
    """
    rl, session, seed = state.cfg.rl, state.session, state.cfg.seed
    sync_engine(state)
    evaluator = make_generator(state.cfg.generator, state.lm, state.tokenizer, state.task.stop_strings,
                               rl.eval_sampling.batch_size, state.model_dir, session)  # vLLM: the same engine
    per_call = max(1, rl.eval_sampling.batch_size // rl.eval_samples)
    results = sample_and_score_chunks(evaluator, state.task, state.eval_problems, rl.eval_samples, state.eval_sampling,
                                      list(rl.eval_ks), lambda chunk: rl_eval_seed(seed, chunk), session.rank,
                                      session.world, per_call)
    summary = summarize(results, list(rl.eval_ks))
    session.tracker.log({f"eval/{k}": v for k, v in summary.items() if k not in ("problems", "n")}, step=step)
    shown = " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith(("avg@", "pass@", "cons@")))
    session.say(f"  eval @ {step}: {shown} | mean length {summary['mean_length']:.1f}")
    return summary


def save(state: RLState) -> Path:
    session = state.session
    trainer_state = {"step": state.step, "prompt_position": state.prompt_position,
                     "scheduler": state.scheduler.state_dict(), "world_size": session.world,
                     "eval_before": state.eval_before, "train_first_step": state.first_step_metrics,
                     "empty_mini_batches": state.empty_mini_batches, "nonfinite_skips": state.nonfinite_skips,
                     "short_steps": state.short_steps,
                     "filled_groups": state.filled_groups, "equal_reward_steps": state.equal_reward_steps}
    return ckpt.save_checkpoint(session.run_dir.checkpoints, state.step, session.accelerator, state.model, lambda m: m.lm,
                                state.optimizer, state.tokenizer, trainer_state, state.cfg.rl.keep_last)


def finish(state: RLState, init_dir: Any, eval_after: dict, last_step_metrics: dict, wall: float) -> dict:
    session, step = state.session, state.step
    final = ckpt.latest_checkpoint(session.run_dir.checkpoints)
    accuracy_key = f"avg@{state.cfg.rl.eval_samples}"
    results = {"stage": "rl", "step": step, "checkpoint": str(final), "init_from": str(init_dir),
               "task": state.task.name, "eval_before": state.eval_before, "eval_after": eval_after,
               "train_first_step": state.first_step_metrics, "train_last_step": last_step_metrics,
               "train_wall_time_s": wall, "num_processes": session.world,
               "empty_mini_batches": state.empty_mini_batches, "nonfinite_skips": state.nonfinite_skips,
               "dynamic_sampling": {"short_steps": state.short_steps, "filled_groups": state.filled_groups,
                                    "groups_per_step": state.cfg.rl.prompts_per_step}}
    session.tracker.summary({f"final/eval_{k}": v for k, v in eval_after.items()})
    if state.equal_reward_steps:
        session.notice("equal_reward_steps", state.equal_reward_steps,
                       f"{state.equal_reward_steps} of {step} steps had equal rewards within every group: zero "
                       "advantages, policy_loss 0, nothing learned from them")
    session.finish(results, step=step, checkpoint=str(final))
    before = f"{state.eval_before[accuracy_key]:.3f}" if state.eval_before else "?"
    session.say(f"done: {step} steps in {wall:.0f}s | held-out {accuracy_key} {before} -> {eval_after[accuracy_key]:.3f}"
                f" | mean length {eval_after['mean_length']:.1f}\n  model: {shown_path(final)}")
    if state.short_steps:
        session.say(f"  {state.short_steps} of {step} steps ran out of sampling rounds and trained on fewer groups "
                    f"({state.filled_groups} places of {step * state.cfg.rl.prompts_per_step} left empty)")
    if state.empty_mini_batches:
        session.say(f"  {state.empty_mini_batches} mini-batch update(s) had no response token with a loss and were skipped")
    return results
