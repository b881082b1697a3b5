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
A held-out evaluation runs before training, every rl.eval_every steps and at the end; with rl.plateau set,
the run ends at the evaluation where held-out accuracy has levelled off (ntp_rl/rl/plateau.py).

Rollouts are seeded by (run seed, step, round, prompt position) and the prompt position is
saved in each checkpoint, so `resume=auto` reproduces the run from its last checkpoint.

The phases live in rl_sample.py (sample, score), rl_update.py (old log-probs, update) and
rl_log.py (log); RLState (rl_state.py) is what they share.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ntp_rl import checkpoint as ckpt
from ntp_rl import stopping
from ntp_rl.config.schema import GeneratorKind
from ntp_rl.config.validate import rl_prompt_split
from ntp_rl.data.tokenizer import load_tokenizer
from ntp_rl.errors import ConfigError
from ntp_rl.engines import make_generator, sampling_weights
from ntp_rl.evaluation import held_out_check
from ntp_rl.faults import kill_point
from ntp_rl.generation import Sampling
from ntp_rl.metrics import Sums
from ntp_rl.models import check_vocab, count_parameters, enable_activation_checkpointing, load_pretrained
from ntp_rl.optim import build_adamw, lr_lambda
from ntp_rl.rl.plateau import Plateau
from ntp_rl.rl.rollout import PolicyLogprobs, PromptStream
from ntp_rl.rundir import shown_path
from ntp_rl.seeding import seed_everything
from ntp_rl.stages.rl_log import log
from ntp_rl.stages.rl_sample import sample, score, sync_engine
from ntp_rl.stages.rl_state import RLState
from ntp_rl.stages.rl_update import STEP_MAXIMA, STEP_SUMS, old_logprobs, update
from ntp_rl.stages.session import StageSession
from ntp_rl.tracking import read_metrics
from ntp_rl.tasks import Task, TaskProblem, build_task


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    from accelerate.utils import DistributedType

    session = StageSession("rl", cfg, overrides, precision=cfg.rl.precision)
    rl_prompt_split(cfg.rl, session.world)
    if cfg.generator.name is GeneratorKind.vllm and session.accelerator.distributed_type is DistributedType.FSDP \
            and not session.sharded:
        raise ConfigError("generator", "vllm under FSDP1 is not supported (its weight sync would gather the whole model "
                          "on every process); launch with fsdp_version: 2 (scripts/accelerate/fsdp.yaml)", "vllm")
    seed_everything(cfg.seed)

    # Everything a user can get wrong is found before the run directory exists.
    task = build_task(cfg.task)
    train_pool = task.problems("train", cfg.rl.train_problems)
    eval_problems = task.problems(cfg.rl.eval_split, cfg.rl.eval_problems)
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
            check_plateau(state, eval_after)
        bar = session.progress(total=cfg.rl.max_steps, initial=state.step, logs=True)
        last_step_metrics: dict = {}
        started = time.perf_counter()
        while state.step < cfg.rl.max_steps and state.stopped_at is None:
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
                check_plateau(state, eval_after)
            saved = state.step % cfg.rl.save_every == 0 or state.step == cfg.rl.max_steps or state.stopped_at is not None
            if saved:
                save(state)
            stopping.stop_if_asked(session.accelerator, lambda: saved or save(state))
        bar.close()
        if eval_after is None:  # resumed from the final checkpoint of a run that died before finishing
            eval_after = evaluate_held_out(state, state.step)
        return finish(state, init_dir, eval_after, last_step_metrics, time.perf_counter() - started)


# ---------------------------------------------------------------------------
# Setup


def load_models(cfg: Any, session: StageSession, init_dir: Any) -> tuple[torch.nn.Module, Any, Optional[torch.nn.Module], str]:
    """The policy (from the checkpoint being resumed, else init_from), its tokenizer, the KL reference,
    and the directory (or hub name) the policy came from."""
    resume_from = session.resume_from
    model_dir = str(resume_from or init_dir)
    policy = load_pretrained(model_dir, key="resume" if resume_from else "init_from", empty=session.empty_model)
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
    model, optimizer = session.prepare(PolicyLogprobs(policy, rl.logprob_chunk_size), policy,
                                       lambda m: build_adamw(m, cfg.optim, fused=torch.cuda.is_available()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, rl.max_steps))
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
        plateau=Plateau(rl.plateau.patience, rl.plateau.min_gain, rl.plateau.min_steps) if rl.plateau.patience else None,
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
        state.stopped_at = saved.get("stopped_at")  # a run that levelled off trains no further
        if state.plateau is not None:
            restore_plateau(state, saved.get("plateau"))
    return state


def restore_plateau(state: RLState, saved: Optional[dict]) -> None:
    """rl.plateau's rule as the checkpoint left it. A checkpoint saved without the rule (a run continued with
    `resume_allow_changes=true rl.plateau.patience=...`) has no state: the rule then reads the held-out checks
    the run logged up to it, so that it stops where a run that had the rule from the start would have."""
    if saved is not None:
        state.plateau.load_state_dict(saved)
        return
    key = f"eval/avg@{state.cfg.rl.eval_samples}"
    logged = {row["step"]: row[key] for row in read_metrics(state.session.run_dir.path)
              if isinstance(row.get(key), (int, float)) and row.get("step", state.step + 1) <= state.step}
    would_have_stopped = state.plateau.replay(sorted(logged.items()))
    if would_have_stopped is not None:
        state.session.notice("plateau_before_resume", would_have_stopped, f"rl.plateau would have stopped this run at "
                             f"step {would_have_stopped}, before the checkpoint it resumes (step {state.step}); it "
                             "stops at its next held-out check")


def announce(state: RLState, init_dir: Any) -> None:
    rl, session = state.cfg.rl, state.session
    session.say(f"ntp-rl rl -> {shown_path(session.run_dir.path)}")
    session.say(f"  policy: {init_dir} ({count_parameters(state.lm) / 1e6:.2f}M params) | task: {state.task.name}, "
                f"{len(state.stream.problems)} train prompts, {len(state.eval_problems)} held-out problems "
                f"({rl.eval_split} split)")
    session.say(f"  GRPO: {rl.prompts_per_step} prompts x G={rl.num_generations} per step, {state.updates_per_step} "
                f"update(s) per step, clip [{1 - rl.clip_eps_low:g}, {1 + rl.clip_eps_high:g}], "
                f"{rl.loss_aggregation.value}, kl_coef {rl.kl_coef:g}, "
                f"dynamic sampling {'on' if rl.dynamic_sampling else 'off'} | {session.world} process(es), "
                f"{session.device.type}")
    if not session.accelerator.unwrap_model(state.model).chunked:
        session.say("  log-probs: the LM head is not a plain linear map (a bias, soft-cap or logit scale), so full "
                    "logits are materialised: memory grows with response tokens x vocabulary")
    if (plateau := rl.plateau).patience:
        session.say(f"  stops once held-out avg@{rl.eval_samples} ({rl.eval_split}) has not beaten its best by more than "
                    f"{plateau.min_gain:g} for {plateau.patience} steps (checked every {rl.eval_every} steps, from step "
                    f"{plateau.min_steps}); rl.max_steps={rl.max_steps} is the cap")
    if state.step:
        session.say(f"  resumed from {session.resume_from} at step {state.step}")


# ---------------------------------------------------------------------------
# Held-out checks, checkpoints, results


def evaluate_held_out(state: RLState, step: int) -> dict[str, float]:
    """Avg@n, Cons@n and pass@k on the task's rl.eval_split problems, logged at `step`.

    The problems are sampled in chunks of one generate call, each with a seed of its own that
    is the same at every evaluation: changes between evaluations come from the model, not the
    dice, and the numbers are the same for any number of processes (as in `ntp-rl eval`).
    """
    rl, session, seed = state.cfg.rl, state.session, state.cfg.seed
    sync_engine(state)
    evaluator = make_generator(state.cfg.generator, state.lm, state.tokenizer, state.task.stop_strings,
                               rl.eval_sampling.batch_size, state.model_dir, session)  # vLLM: the same engine
    with sampling_weights(state.cfg.generator, state.model):
        summary = held_out_check(evaluator, state.task, state.eval_problems, rl.eval_samples, state.eval_sampling,
                                 list(rl.eval_ks), seed, session.rank, session.world, rl.eval_sampling.batch_size)
    session.tracker.log({f"eval/{k}": v for k, v in summary.items() if k not in ("problems", "n")}, step=step)
    shown = " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith(("avg@", "pass@", "cons@")))
    session.say(f"  eval @ {step}: {shown} | mean length {summary['mean_length']:.1f}")
    return summary


def check_plateau(state: RLState, summary: dict[str, float]) -> None:
    """Feed rl.plateau's rule the evaluation just made; mark the run stopped when accuracy has levelled off."""
    rl = state.cfg.rl
    key = f"avg@{rl.eval_samples}"
    if state.plateau is None or not state.plateau.levelled_off(state.step, summary[key]):
        return
    state.stopped_at = {"step": state.step, "rule": "plateau", "metric": key, "value": summary[key],
                        "best": state.plateau.best, "best_step": state.plateau.best_step, "split": rl.eval_split,
                        "patience": rl.plateau.patience, "min_gain": rl.plateau.min_gain}


def save(state: RLState) -> Path:
    session = state.session
    trainer_state = {"step": state.step, "prompt_position": state.prompt_position,
                     "scheduler": state.scheduler.state_dict(), "world_size": session.world,
                     "eval_before": state.eval_before, "train_first_step": state.first_step_metrics,
                     "empty_mini_batches": state.empty_mini_batches, "nonfinite_skips": state.nonfinite_skips,
                     "short_steps": state.short_steps,
                     "filled_groups": state.filled_groups, "equal_reward_steps": state.equal_reward_steps,
                     "plateau": state.plateau.state_dict() if state.plateau else None, "stopped_at": state.stopped_at}
    return ckpt.save_checkpoint(session.run_dir.checkpoints, state.step, session.accelerator, state.model, lambda m: m.lm,
                                state.optimizer, state.tokenizer, trainer_state, state.cfg.rl.keep_last)


def finish(state: RLState, init_dir: Any, eval_after: dict, last_step_metrics: dict, wall: float) -> dict:
    session, step = state.session, state.step
    final = ckpt.latest_checkpoint(session.run_dir.checkpoints)
    accuracy_key = f"avg@{state.cfg.rl.eval_samples}"
    results = {"stage": "rl", "step": step, "checkpoint": str(final), "init_from": str(init_dir),
               "task": state.task.name, "eval_split": state.cfg.rl.eval_split,
               "eval_before": state.eval_before, "eval_after": eval_after,
               "train_first_step": state.first_step_metrics, "train_last_step": last_step_metrics,
               "train_wall_time_s": wall, "num_processes": session.world,
               "empty_mini_batches": state.empty_mini_batches, "nonfinite_skips": state.nonfinite_skips,
               "dynamic_sampling": {"short_steps": state.short_steps, "filled_groups": state.filled_groups,
                                    "groups_per_step": state.cfg.rl.prompts_per_step}}
    if state.plateau is not None:  # null when rl.max_steps came first
        results["stopped_at"] = state.stopped_at
        if state.stopped_at is None:
            session.notice("plateau_not_reached", 1, f"held-out accuracy had not levelled off by rl.max_steps={step} "
                           f"(rl.plateau.patience={state.cfg.rl.plateau.patience}, min_gain={state.cfg.rl.plateau.min_gain:g}): "
                           "RL ran all of its steps")
    session.tracker.summary({f"final/eval_{k}": v for k, v in eval_after.items()})
    if state.equal_reward_steps:
        session.notice("equal_reward_steps", state.equal_reward_steps,
                       f"{state.equal_reward_steps} of {step} steps had equal rewards within every group: zero "
                       "advantages, policy_loss 0, nothing learned from them")
    session.finish(results, step=step, checkpoint=str(final))
    if (stopped := state.stopped_at) is not None:
        session.say(f"  stopped at step {step} of {state.cfg.rl.max_steps}: {stopped['split']} {stopped['metric']} "
                    f"{stopped['value']:.3f}, no gain above {stopped['min_gain']:g} on its best ({stopped['best']:.3f} "
                    f"at step {stopped['best_step']}) for {step - stopped['best_step']} steps")
    before = f"{state.eval_before[accuracy_key]:.3f}" if state.eval_before else "?"
    session.say(f"done: {step} steps in {wall:.0f}s | held-out ({state.cfg.rl.eval_split}) {accuracy_key} {before} -> {eval_after[accuracy_key]:.3f}"
                f" | mean length {eval_after['mean_length']:.1f}\n  model: {shown_path(final)}")
    if state.short_steps:
        session.say(f"  {state.short_steps} of {step} steps ran out of sampling rounds and trained on fewer groups "
                    f"({state.filled_groups} places of {step * state.cfg.rl.prompts_per_step} left empty)")
    if state.empty_mini_batches:
        session.say(f"  {state.empty_mini_batches} mini-batch update(s) had no response token with a loss and were skipped")
    return results
