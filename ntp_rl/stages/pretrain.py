"""`ntp-rl pretrain`: next-token pre-training with the reward-shaped loss.

One loop, top to bottom: build data and model, then for each step take the global batch,
run this process's share of it in micro-batches, clip, step, and now and then log,
validate and checkpoint. Everything that decides the next step (weights, optimizer,
schedule, RNG, data position) is in the checkpoint, so `resume=auto` continues exactly.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ntp_rl import checkpoint as ckpt
from ntp_rl.config import ModelArch, NonFinitePolicy, check_batch, check_loss, check_pretrain
from ntp_rl.errors import ConfigError
from ntp_rl.faults import kill_point
from ntp_rl.losses import STAT_NAMES
from ntp_rl.models import (ShapedLossLM, build_model, check_same_architecture, check_vocab, count_parameters,
                           load_pretrained)
from ntp_rl.rundir import RESULTS_FILE, read_results, recording_failures, write_json_atomic
from ntp_rl.runtime import (choose_run, flops_per_token, make_accelerator, open_run, peak_flops, peak_memory_gib,
                            printer, resolved_wandb_mode, saved_step, stop_diverged)
from ntp_rl.optim import build_adamw, lr_lambda


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    check_pretrain(cfg)
    mode = resolved_wandb_mode(cfg)
    accelerator = make_accelerator(cfg.train.precision, mode)
    micro_batch_size, grad_accum = check_batch(cfg.train.batch_size, cfg.train.micro_batch_size, accelerator.num_processes)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)

    # Data first: it decides the vocabulary, which some checks need. Rank 0 builds (and
    # caches) the corpus and tokenizer; the others then read the cache.
    from ntp_rl.data.pretrain import build_pretrain_data

    cache_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache")
    tokenizer_source = cfg.data.tokenizer or (cfg.model.name_or_path if ModelArch(cfg.model.arch) is ModelArch.hf else None)
    with accelerator.main_process_first():
        data = build_pretrain_data(cfg.data, cache_dir=cache_dir, seed=cfg.seed, tokenizer_name_or_path=tokenizer_source)
    tokenizer = data.tokenizer
    check_loss(cfg.loss, vocab_size=len(tokenizer))

    run_dir = choose_run(cfg, "pretrain", overrides, accelerator)
    resume_from = run_dir.resume_from
    finished = read_results(run_dir.path) if resume_from else None
    if finished is not None and finished["step"] >= cfg.train.max_steps:
        accelerator.print(f"ntp-rl pretrain: {run_dir.path} already finished at step {finished['step']}")
        return finished
    if resume_from is not None:
        lm = load_pretrained(str(resume_from), key="resume")
        check_same_architecture(lm, cfg.model, str(resume_from))
    else:
        lm = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    check_vocab(lm, tokenizer)
    if cfg.data.seq_len > lm.config.max_position_embeddings:
        raise ConfigError("data.seq_len", f"exceeds the model's max_position_embeddings={lm.config.max_position_embeddings}",
                          cfg.data.seq_len)
    if cfg.model.gradient_checkpointing:
        lm.gradient_checkpointing_enable()

    with (recording_failures(run_dir, accelerator.is_main_process),
          open_run(run_dir, cfg, "pretrain", overrides, accelerator, mode,
                   resume_step=saved_step(resume_from) if resume_from else None) as tracker):
        model = ShapedLossLM(lm, cfg.loss)
        optimizer = build_adamw(model, cfg.optim, fused=torch.cuda.is_available())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
        model, optimizer = accelerator.prepare(model, optimizer)
        if cfg.train.compile:
            model = torch.compile(model)

        start_step, skipped = 0, 0
        if resume_from is not None:
            state = ckpt.load_training_state(resume_from, accelerator, model, optimizer)
            scheduler.load_state_dict(state["scheduler"])
            start_step, skipped = int(state["step"]), int(state.get("nonfinite_skips", 0))
            data.train.seek(int(state["data_position"]))
        else:
            data.train.seek(0)

        rank, world = accelerator.process_index, accelerator.num_processes
        device = accelerator.device
        per_rank = cfg.train.batch_size // world
        seq_len = cfg.data.seq_len
        tokens_per_step = cfg.train.batch_size * seq_len
        n_params = count_parameters(lm)
        flops_token = flops_per_token(count_parameters(lm, exclude_embeddings=True), lm.config.num_hidden_layers,
                                      lm.config.num_attention_heads, getattr(lm.config, "head_dim", None)
                                      or lm.config.hidden_size // lm.config.num_attention_heads, seq_len)
        peak = peak_flops(device)
        say = printer(accelerator.is_main_process)
        say(f"ntp-rl pretrain -> {run_dir.path}")
        say(f"  data:  {data.description}; unigram baseline NLL {data.unigram_nll:.3f}")
        say(f"  model: {cfg.model.name} ({n_params / 1e6:.2f}M params) | loss: {cfg.loss.name} (beta={cfg.loss.beta}, "
            f"lambda_top={cfg.loss.lambda_top}, lambda_tail={cfg.loss.lambda_tail}, k={cfg.loss.k}, "
            f"{_value(cfg.loss.positive_form)}) | {world} process(es), grad accum {grad_accum}, {device.type}")
        if start_step:
            say(f"  resumed from {resume_from} at step {start_step}")
        tracker.summary({"unigram_nll": data.unigram_nll, "params": n_params})

        def validate(step: int) -> dict[str, float]:
            model.eval()
            metrics = _evaluate(model, data.val[: cfg.train.eval_sequences], micro_batch_size, accelerator)
            model.train()
            tracker.log({f"val/{k}": v for k, v in metrics.items()} | {"val/unigram_nll": data.unigram_nll}, step=step)
            say(f"  val @ {step}: nll {metrics['nll']:.4f} (unigram {data.unigram_nll:.3f}) | ppl {metrics['ppl']:.3f} | "
                f"entropy {metrics['entropy']:.3f} | top-1 {metrics['accuracy']:.3f} | tail mass {metrics['tail_mass']:.4f}")
            return metrics

        def save(step: int) -> Path:
            state = {"step": step, "data_position": data.train.position, "scheduler": scheduler.state_dict(),
                     "nonfinite_skips": skipped, "world_size": world}
            return ckpt.save_checkpoint(run_dir.checkpoints, step, accelerator, model, lambda m: m.lm, optimizer,
                                        tokenizer, state, cfg.train.keep_last)

        val_metrics: dict[str, float] = {}
        if start_step == 0:
            val_metrics = validate(0)
        bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc="pretrain", dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and cfg.logger.progress_bar))
        started = time.perf_counter()
        step = start_step
        while step < cfg.train.max_steps:
            step_start = time.perf_counter()
            batch = data.train.take(cfg.train.batch_size)[rank * per_rank:(rank + 1) * per_rank].to(device)
            loss_sum = torch.zeros((), device=device)
            stat_sums = torch.zeros(len(STAT_NAMES), device=device)
            for micro, chunk in enumerate(batch.split(micro_batch_size)):
                # Gradients are averaged over processes only on the last micro-batch.
                sync = micro == grad_accum - 1
                with nullcontext() if sync else accelerator.no_sync(model):
                    out = model(input_ids=chunk[:, :-1], labels=chunk[:, 1:])
                    accelerator.backward(out.loss / grad_accum)
                loss_sum += out.loss.detach()
                stat_sums += torch.stack([out.stats[name] for name in STAT_NAMES])
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm.float())
            all_finite = accelerator.reduce(finite.float(), reduction="sum").item() == world
            step += 1
            if all_finite:
                optimizer.step()
            else:
                skipped += 1
                if _value(cfg.train.on_nonfinite) == NonFinitePolicy.stop.value or skipped > cfg.train.max_nonfinite_skips:
                    stop_diverged(step, loss_sum / grad_accum, grad_norm, run_dir, tracker, bar)
                say(f"  step {step}: non-finite loss or gradient, update skipped ({skipped} so far)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            bar.update(1)
            kill_point("step", step)

            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                means = accelerator.reduce(torch.cat([loss_sum.view(1), stat_sums]) / grad_accum, reduction="mean")
                elapsed = time.perf_counter() - step_start
                metrics = {"train/loss": means[0].item(), **{f"train/{n}": v.item() for n, v in zip(STAT_NAMES, means[1:])}}
                metrics["train/ppl"] = math.exp(min(metrics["train/nll"], 50.0))
                metrics |= {"train/lr": scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                            "train/nonfinite_skips": skipped, "perf/tokens_per_sec": tokens_per_step / elapsed,
                            "perf/step_time_s": elapsed, "perf/peak_mem_gib": peak_memory_gib(device),
                            "perf/tokens_seen": step * tokens_per_step}
                if peak:
                    metrics["perf/mfu"] = flops_token * tokens_per_step / elapsed / (peak * world)
                tracker.log(metrics, step=step)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", nll=f"{metrics['train/nll']:.3f}",
                                ent=f"{metrics['train/entropy']:.3f}", tok_s=f"{metrics['perf/tokens_per_sec']:.0f}",
                                **({"mfu": f"{metrics['perf/mfu']:.1%}"} if peak else {}))
            if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
                val_metrics = validate(step)
            if step % cfg.train.save_every == 0 or step == cfg.train.max_steps:
                save(step)
        bar.close()

        if not val_metrics:  # resumed from the final checkpoint of a run that died before finishing
            val_metrics = validate(step)
        wall = time.perf_counter() - started
        final = ckpt.latest_checkpoint(run_dir.checkpoints)
        results = {"stage": "pretrain", "step": step, "checkpoint": str(final), "unigram_nll": data.unigram_nll,
                   "val": val_metrics, "train_wall_time_s": wall, "tokens": step * tokens_per_step,
                   "num_processes": world, "loss": {k: _value(cfg.loss[k]) for k in cfg.loss}}
        tracker.summary({f"final/val_{k}": v for k, v in val_metrics.items()})
        if accelerator.is_main_process:
            write_json_atomic(run_dir.path / RESULTS_FILE, results)
            run_dir.update(status="finished", step=step, checkpoint=str(final))
        say(f"done: {step} steps in {wall:.0f}s | val nll {val_metrics['nll']:.4f} vs unigram {data.unigram_nll:.3f} | "
            f"ppl {val_metrics['ppl']:.3f} | entropy {val_metrics['entropy']:.3f}\n  model: {final}")
        accelerator.wait_for_everyone()
        return results


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


@torch.no_grad()
def _evaluate(model: torch.nn.Module, windows: torch.Tensor, micro_batch_size: int, accelerator: Any) -> dict[str, float]:
    """Token-weighted means of the loss diagnostics on validation windows, split over processes."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = windows[rank::world].to(accelerator.device)
    sums = torch.zeros(len(STAT_NAMES) + 2, device=accelerator.device)  # stats..., loss, tokens
    for chunk in mine.split(micro_batch_size):
        out = model(input_ids=chunk[:, :-1], labels=chunk[:, 1:])
        n = out.stats["num_tokens"]
        sums += torch.cat([torch.stack([out.stats[s] for s in STAT_NAMES]) * n, (out.loss * n).view(1), n.view(1)])
    sums = accelerator.reduce(sums, reduction="sum")
    tokens = sums[-1].clamp_min(1)
    metrics = {name: (sums[i] / tokens).item() for i, name in enumerate(STAT_NAMES)}
    metrics["loss"] = (sums[-2] / tokens).item()
    metrics["ppl"] = math.exp(min(metrics["nll"], 50.0))
    return metrics
