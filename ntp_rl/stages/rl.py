"""`ntp-rl rl`: on-policy GRPO with verifiable rewards (DAPO's clip-higher and dynamic sampling).

One loop, top to bottom. Each step: every process samples G completions for its share of
the step's prompts, the groups of all processes are gathered so that all agree on which
groups carry signal (dynamic sampling), each process takes its share of the kept groups,
computes group-relative advantages, and the policy takes mu x mini-batch clipped-surrogate
updates. The loss is averaged over the response tokens of the global batch, so any number
of processes gives the same update. A held-out evaluation runs before training, every
rl.eval_every steps and at the end.

Rollouts are seeded by (run seed, step, round, prompt position) and the prompt position is
saved in each checkpoint, so `resume=auto` reproduces the run from its last checkpoint.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ntp_rl import checkpoint as ckpt
from ntp_rl.config import check_rl
from ntp_rl.data.pretrain import mix_seed
from ntp_rl.data.tokenizer import load_tokenizer
from ntp_rl.evaluation import sample_and_score, summarize
from ntp_rl.faults import kill_point
from ntp_rl.generation import HFGenerator, Sampling
from ntp_rl.models import check_vocab, count_parameters, load_pretrained
from ntp_rl.optim import build_adamw, lr_lambda
from ntp_rl.rl.advantages import compute_advantages
from ntp_rl.rl.policy_loss import POLICY_LOSSES, aggregate, aggregation_count, k3_kl
from ntp_rl.rl.rollout import (CollectedGroups, Group, PromptStream, build_batch, collect_groups, rollout_seed,
                               sample_groups, token_logprobs)
from ntp_rl.rundir import RESULTS_FILE, read_results, recording_failures, write_json_atomic
from ntp_rl.runtime import (choose_run, make_accelerator, open_run, peak_flops, peak_memory_gib, printer,
                            resolved_wandb_mode, saved_step, stop_diverged)
from ntp_rl.tasks import build_task


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    check_rl(cfg)
    rl = cfg.rl
    mode = resolved_wandb_mode(cfg)
    accelerator = make_accelerator(rl.precision, mode)
    rank, world = accelerator.process_index, accelerator.num_processes
    from accelerate.utils import gather_object, set_seed

    set_seed(cfg.seed)

    # Everything a user can get wrong is found before the run directory exists.
    task = build_task(cfg.task)
    train_pool = task.problems("train", rl.train_problems)
    eval_problems = task.problems("test", rl.eval_problems)
    init_dir = _model_dir(cfg.init_from)
    run_dir = choose_run(cfg, "rl", overrides, accelerator)
    resume_from = run_dir.resume_from
    finished = read_results(run_dir.path) if resume_from else None
    if finished is not None and finished["step"] >= rl.max_steps:
        accelerator.print(f"ntp-rl rl: {run_dir.path} already finished at step {finished['step']}")
        return finished
    model_dir = str(resume_from or init_dir)
    policy = load_pretrained(model_dir, key="resume" if resume_from else "init_from")
    tokenizer = load_tokenizer(model_dir)
    check_vocab(policy, tokenizer)
    reference = None
    if rl.kl_coef > 0:  # frozen init_from weights, for the KL penalty
        reference = load_pretrained(str(init_dir), key="init_from").to(accelerator.device).eval().requires_grad_(False)

    with (recording_failures(run_dir, accelerator.is_main_process),
          open_run(run_dir, cfg, "rl", overrides, accelerator, mode,
                   resume_step=saved_step(resume_from) if resume_from else None) as tracker):
        optimizer = build_adamw(policy, cfg.optim, fused=torch.cuda.is_available())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, rl.max_steps))
        model, optimizer = accelerator.prepare(policy, optimizer)

        start_step, prompt_position, eval_before, first_step = 0, 0, None, None
        if resume_from is not None:
            state = ckpt.load_training_state(resume_from, accelerator, model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            start_step, prompt_position = int(state["step"]), int(state["prompt_position"])
            eval_before, first_step = state.get("eval_before"), state.get("train_first_step")

        device = accelerator.device
        lm = accelerator.unwrap_model(model)
        G = rl.num_generations
        per_rank = rl.prompts_per_step // world  # prompts (= groups) each process samples and trains on
        groups_per_update = per_rank // rl.num_mini_batches
        updates_per_step = rl.num_iterations * rl.num_mini_batches
        # With a single update the policy that sampled is the one being updated: its log-probs
        # are the current ones, detached, and need no pass of their own.
        separate_old_pass = updates_per_step > 1
        sampling = Sampling(rl.sampling.temperature, rl.sampling.top_p, rl.sampling.max_new_tokens)
        eval_sampling = Sampling(rl.eval_sampling.temperature, rl.eval_sampling.top_p, rl.eval_sampling.max_new_tokens)
        rollouts = HFGenerator(lm, tokenizer, task.stop_strings, batch_size=rl.sampling.batch_size)
        prompts_per_call = max(1, rl.sampling.batch_size // G)
        policy_loss = POLICY_LOSSES[rl.policy_loss]
        stream = PromptStream(train_pool, cfg.seed)
        say = printer(accelerator.is_main_process)
        n_params, peak = count_parameters(lm, exclude_embeddings=True), peak_flops(device)
        say(f"ntp-rl rl -> {run_dir.path}")
        say(f"  policy: {init_dir} ({count_parameters(lm) / 1e6:.2f}M params) | task: {task.name}, "
            f"{len(train_pool)} train prompts, {len(eval_problems)} held-out problems")
        say(f"  GRPO: {rl.prompts_per_step} prompts x G={G} per step, {updates_per_step} update(s) per step, "
            f"clip [{1 - rl.clip_eps_low:g}, {1 + rl.clip_eps_high:g}], {_value(rl.loss_aggregation)}, "
            f"kl_coef {rl.kl_coef:g}, dynamic sampling {'on' if rl.dynamic_sampling else 'off'} | "
            f"{world} process(es), {device.type}")
        if start_step:
            say(f"  resumed from {resume_from} at step {start_step}")

        def held_out(step: int) -> dict[str, float]:
            # Each process scores a slice of the problems with the same seed at every
            # evaluation, so changes between evaluations come from the model, not the dice.
            mine = eval_problems[rank::world]
            evaluator = HFGenerator(lm, tokenizer, task.stop_strings, batch_size=rl.eval_sampling.batch_size)
            results = sample_and_score(evaluator, task, mine, rl.eval_samples, eval_sampling, list(rl.eval_ks),
                                       seed=mix_seed("eval", cfg.seed) % 2**40)
            summary = summarize(gather_object(results), list(rl.eval_ks))
            tracker.log({f"eval/{k}": v for k, v in summary.items() if k not in ("problems", "n")}, step=step)
            shown = " | ".join(f"{k} {v:.3f}" for k, v in summary.items() if k.startswith(("avg@", "pass@", "cons@")))
            say(f"  eval @ {step}: {shown} | mean length {summary['mean_length']:.1f}")
            return summary

        def save(step: int) -> Path:
            state = {"step": step, "prompt_position": prompt_position, "scheduler": scheduler.state_dict(),
                     "world_size": world, "eval_before": eval_before, "train_first_step": first_step}
            return ckpt.save_checkpoint(run_dir.checkpoints, step, accelerator, model, lambda m: m, optimizer,
                                        tokenizer, state, rl.keep_last)

        eval_after: Optional[dict] = None
        if start_step == 0:
            eval_before = eval_after = held_out(0)
        bar = tqdm(total=rl.max_steps, initial=start_step, desc="rl", dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and cfg.logger.progress_bar))
        last_step: dict = {}
        started = time.perf_counter()
        step = start_step
        while step < rl.max_steps:
            step_start = time.perf_counter()
            step += 1

            # 1. Rollouts: this process's share of each round's prompts, then every process's groups.
            def sample_round(round_: int) -> list[Group]:
                nonlocal prompt_position
                offset = prompt_position + rank * per_rank
                problems = stream.take(offset, per_rank)
                groups = sample_groups(rollouts, task, tokenizer, problems, G, sampling, prompts_per_call,
                                       lambda i: rollout_seed(cfg.seed, step, round_, offset + i), cfg.task.format_reward)
                prompt_position += rl.prompts_per_step
                return gather_object(groups)

            gen_start = time.perf_counter()
            collected = collect_groups(sample_round, rl.prompts_per_step, rl.dynamic_sampling, rl.max_sampling_rounds)
            gen_time = time.perf_counter() - gen_start
            mine = collected.groups[rank * per_rank:(rank + 1) * per_rank]

            # 2. Advantages within each group, then one row per sample.
            rewards = torch.tensor([g.rewards for g in mine], dtype=torch.float32)
            advantages = compute_advantages(rl.advantage, rewards, rl.scale_rewards, rl.advantage_eps)
            batch = build_batch(mine, advantages, tokenizer.pad_token_id, rl.mask_truncated).to(device)

            # 3. Log-probs of the rollout policy (and the reference), without gradients.
            train_start = time.perf_counter()
            sums = torch.zeros(len(_SUMS), device=device)
            if separate_old_pass or reference is not None:
                old, ref = [], []
                with torch.no_grad():
                    for micro in batch.split(rl.micro_batch_size):
                        if separate_old_pass:
                            logp, entropy = token_logprobs(model, micro, sampling.temperature, with_entropy=True)
                            old.append(_pad_to(logp, batch.response_mask.shape[1]))
                            _add(sums, entropy=(entropy * micro.response_mask).sum(), tokens=micro.response_mask.sum())
                        if reference is not None:
                            with accelerator.autocast():  # the reference is not prepared, so not autocast by Accelerate
                                ref_logp = token_logprobs(reference, micro, sampling.temperature)[0]
                            ref.append(_pad_to(ref_logp, batch.response_mask.shape[1]))
                batch.old_logp = torch.cat(old) if old else None
                batch.ref_logp = torch.cat(ref) if ref else None

            # 4. mu passes over the batch, one optimizer update per mini-batch.
            for _ in range(rl.num_iterations):
                for first in range(0, len(batch), groups_per_update * G):
                    minibatch = batch.rows(first, first + groups_per_update * G)
                    # Normalise by the whole global mini-batch: each process's loss is its share of the global average.
                    count = accelerator.reduce(aggregation_count(minibatch.response_mask, rl.loss_aggregation), "sum")
                    micros = minibatch.split(rl.micro_batch_size)
                    for i, micro in enumerate(micros):
                        # Gradients are averaged over processes only on the last micro-batch.
                        with nullcontext() if i == len(micros) - 1 else accelerator.no_sync(model):
                            logp, entropy = token_logprobs(model, micro, sampling.temperature,
                                                           with_entropy=not separate_old_pass)
                            old_logp = micro.old_logp if separate_old_pass else logp.detach()
                            out = policy_loss(logp, old_logp, micro.advantages, rl.clip_eps_low, rl.clip_eps_high)
                            per_token = out.loss
                            if reference is not None:
                                kl = k3_kl(logp, micro.ref_logp)
                                per_token = per_token + rl.kl_coef * kl
                            loss = aggregate(per_token, micro.response_mask, rl.loss_aggregation, count)
                            # DDP averages gradients over processes; the loss is already a share of the
                            # global average, so undo the division.
                            accelerator.backward(loss * world)
                        mask = micro.response_mask
                        _add(sums, loss=loss.detach() / updates_per_step, clip_low=(out.low_clipped & mask).sum(),
                             clip_high=(out.high_clipped & mask).sum(), clip_tokens=mask.sum(),
                             kl=(kl.detach() * mask).sum() if reference is not None else 0.0)
                        if entropy is not None:
                            _add(sums, entropy=(entropy * mask).sum(), tokens=mask.sum())
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    if not torch.isfinite(grad_norm):
                        stop_diverged(step, sums[_SUMS.index("loss")], grad_norm, run_dir, tracker, bar)
                    _add(sums, grad_norm=grad_norm.detach() / updates_per_step)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            kill_point("step", step)
            train_time = time.perf_counter() - train_start

            # 5. Records.
            _add(sums, seq_tokens=batch.attention_mask.sum())
            totals = dict(zip(_SUMS, accelerator.reduce(sums, "sum").tolist()))
            metrics = _rollout_metrics(collected)
            metrics |= {
                "entropy": totals["entropy"] / max(totals["tokens"], 1),
                "clip_ratio/low_mean": totals["clip_low"] / max(totals["clip_tokens"], 1),
                "clip_ratio/high_mean": totals["clip_high"] / max(totals["clip_tokens"], 1),
                "policy_loss": totals["loss"],
                "grad_norm": totals["grad_norm"] / world,  # every process holds the same (global) norm
                "lr": scheduler.get_last_lr()[0],
                "perf/gen_tokens_per_sec": (collected_tokens := metrics.pop("_gen_tokens")) / max(gen_time, 1e-9),
                "perf/gen_time_s": gen_time,
                "perf/train_time_s": train_time,
                "perf/step_time_s": time.perf_counter() - step_start,
                "perf/peak_mem_gib": peak_memory_gib(device),
            }
            # Model FLOPs: forward+backward (6N a token) per pass over the batch, a forward (2N) for
            # each extra no-grad pass and for every sampled token (the attention term left out).
            trained = totals["seq_tokens"] * rl.num_iterations
            extra_forwards = totals["seq_tokens"] * (int(separate_old_pass) + int(reference is not None))
            metrics["perf/train_tokens_per_sec"] = trained / max(train_time, 1e-9)
            if peak:
                flops = 6 * n_params * trained + 2 * n_params * (extra_forwards + collected_tokens)
                metrics["perf/mfu"] = flops / metrics["perf/step_time_s"] / (peak * world)
            if reference is not None:
                metrics["kl"] = totals["kl"] / max(totals["clip_tokens"], 1)
            first_step = first_step or metrics
            last_step = metrics
            if step % rl.log_every == 0 or step == rl.max_steps:
                tracker.log(metrics, step=step)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                                ent=f"{metrics['entropy']:.3f}", len=f"{metrics['completions/mean_length']:.1f}",
                                drop=metrics["dynamic_sampling/dropped_groups"],
                                **({"mfu": f"{metrics['perf/mfu']:.1%}"} if "perf/mfu" in metrics else {}))
            if step % rl.eval_every == 0 or step == rl.max_steps:
                eval_after = held_out(step)
            if step % rl.save_every == 0 or step == rl.max_steps:
                save(step)
        bar.close()

        if eval_after is None:  # resumed from the final checkpoint of a run that died before finishing
            eval_after = held_out(step)
        wall = time.perf_counter() - started
        final = ckpt.latest_checkpoint(run_dir.checkpoints)
        accuracy_key = f"avg@{rl.eval_samples}"
        results = {"stage": "rl", "step": step, "checkpoint": str(final), "init_from": str(init_dir), "task": task.name,
                   "eval_before": eval_before, "eval_after": eval_after, "train_first_step": first_step,
                   "train_last_step": last_step, "train_wall_time_s": wall, "num_processes": world}
        tracker.summary({f"final/eval_{k}": v for k, v in eval_after.items()})
        if accelerator.is_main_process:
            write_json_atomic(run_dir.path / RESULTS_FILE, results)
            run_dir.update(status="finished", step=step, checkpoint=str(final))
        before = f"{eval_before[accuracy_key]:.3f}" if eval_before else "?"
        say(f"done: {step} steps in {wall:.0f}s | held-out {accuracy_key} {before} -> {eval_after[accuracy_key]:.3f} | "
            f"mean length {eval_after['mean_length']:.1f}\n  model: {final}")
        accelerator.wait_for_everyone()
        return results


# Per-step sums over micro-batches, reduced over processes in one call.
_SUMS = ("loss", "entropy", "tokens", "clip_low", "clip_high", "clip_tokens", "kl", "grad_norm", "seq_tokens")


def _add(sums: torch.Tensor, **values: Any) -> None:
    for name, value in values.items():
        sums[_SUMS.index(name)] += value


def _pad_to(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Micro-batches are trimmed to their longest row; the batch's tensors are full width."""
    return torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]))


def _rollout_metrics(collected: CollectedGroups) -> dict[str, float]:
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


def _model_dir(init_from: str) -> Any:
    """A run directory or checkpoint -> its latest model directory; a hub name stays a name (check_rl vetted it)."""
    return ckpt.resolve_model_dir(init_from, key="init_from") if Path(init_from).exists() else init_from


def _value(x: Any) -> Any:
    return getattr(x, "value", x)
