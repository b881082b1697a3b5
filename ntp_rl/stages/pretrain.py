"""`ntp-rl pretrain`: next-token pre-training with the reward-shaped loss.

Top to bottom: build the data (it decides the vocabulary), choose the run directory, build
or reload the model, then train: for each step take the global batch, run this process's
share of it in micro-batches, clip, step, and now and then log, validate and checkpoint.
Everything that decides the next step (weights, optimizer, schedule, RNG, data position) is
in the checkpoint, so `resume=auto` continues exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ntp_rl import checkpoint as ckpt
from ntp_rl import moe, stopping
from ntp_rl.config.schema import GeneratorConfig, ModelArch, NonFinitePolicy
from ntp_rl.config.validate import check_loss, check_seq_len, micro_batches
from ntp_rl.data.packing import PretrainData
from ntp_rl.errors import DataError
from ntp_rl.faults import kill_point
from ntp_rl.losses import STAT_NAMES
from ntp_rl.models import (ShapedLossLM, build_model, check_same_architecture, check_vocab, count_parameters,
                           enable_activation_checkpointing, load_pretrained, rope_theta_of, set_balancing)
from ntp_rl.optim import build_adamw, lr_lambda
from ntp_rl.runtime import flops_per_token, peak_flops, peak_memory_gib
from ntp_rl.seeding import seed_everything
from ntp_rl.rundir import shown_path
from ntp_rl.stages.session import StageSession
from ntp_rl.tracking import Tracker


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    """`pretrain`, and `midtrain`: the same loop from init_from's weights, with the model's new RoPE base."""
    if cfg.stage == "midtrain":  # the model is init_from's latest checkpoint (or hub model), recorded as such
        cfg.model.name_or_path = str(ckpt.resolve_init_from(cfg.init_from))
    session = StageSession(cfg.stage, cfg, overrides, precision=cfg.train.precision)
    batching = micro_batches(cfg.train.batch_size, cfg.train.micro_batch_size, session.world)
    seed_everything(cfg.seed)

    # Everything a user can get wrong is found before the run directory exists.
    data = build_data(cfg, session)
    check_loss(cfg.loss, vocab_size=len(data.tokenizer))
    stop_at = build_stop_at(cfg)
    if data.skipped_rows:
        session.notice("rows_without_text", data.skipped_rows, f"{data.skipped_rows} row(s) of data.path={cfg.data.path} "
                       f"have no text in data.text_field={cfg.data.text_field} (null or empty) and were left out")
    session.choose_run_dir()
    if (done := session.finished_results(cfg.train.max_steps)) is not None:
        return done
    lm = build_lm(cfg, data, session.resume_from, empty=session.empty_model)

    with session.open(resume_step=session.resume_step()) as tracker:
        training = setup_training(cfg, session, lm, batching)
        restore(training, session.resume_from, data, session)
        announce(cfg, session, data, training, stop_at)
        tracker.summary({"unigram_nll": data.unigram_nll, "params": count_parameters(lm)})
        started = time.perf_counter()
        val_metrics = train(cfg, session, data, training, tracker, stop_at)
        wall = time.perf_counter() - started
        return finish(cfg, session, data, training, val_metrics, wall)


@dataclass
class Training:
    """What the training loop updates, and where it is."""

    lm: torch.nn.Module  # the Hugging Face model inside `model`
    model: torch.nn.Module  # ShapedLossLM, prepared by Accelerate (and compiled if asked)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    micro_batch_size: int
    grad_accum: int
    step: int = 0
    nonfinite_skips: int = 0
    moe_metrics: dict = field(default_factory=dict)  # the last step's expert load (MoE models)
    stopped_at: Optional[dict] = None  # train.stop_at: the check that reached the accuracy (step, avg@n)


@dataclass
class StopAt:
    """train.stop_at's check: the task and the held-out problems it samples."""

    task: Any
    problems: list
    accuracy_key: str


# ---------------------------------------------------------------------------
# Setup


def build_data(cfg: Any, session: StageSession) -> PretrainData:
    """Rank 0 builds (and caches) the corpus and tokenizer; the others then read the cache."""
    from ntp_rl.data import build_pretrain_data

    cache_dir = Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache")
    tokenizer_source = cfg.data.tokenizer or (cfg.model.name_or_path if cfg.model.arch is ModelArch.hf else None)
    with session.accelerator.main_process_first():
        return build_pretrain_data(cfg.data, cache_dir=cache_dir, seed=cfg.seed, tokenizer_name_or_path=tokenizer_source)


def build_stop_at(cfg: Any) -> Optional[StopAt]:
    """The task check of train.stop_at (None when unset); built before the run directory, so a task that
    cannot be built fails first."""
    stop_at = cfg.train.stop_at
    if stop_at.accuracy is None:
        return None
    from ntp_rl.tasks import build_task

    task = build_task(cfg.task)
    return StopAt(task, task.problems(stop_at.split, stop_at.problems), f"avg@{stop_at.samples}")


def build_lm(cfg: Any, data: PretrainData, resume_from: Optional[Path], empty: bool = False) -> torch.nn.Module:
    """A fresh model from the preset, or the weights of the checkpoint being resumed; `empty`: the shape only
    (FSDP's processes other than the first, which get their shards from it)."""
    tokenizer = data.tokenizer
    if resume_from is not None:
        lm = load_pretrained(str(resume_from), key="resume", empty=empty)
        check_same_architecture(lm, cfg.model, str(resume_from))
        set_balancing(lm, cfg.model)
    else:
        lm = build_model(cfg.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, empty=empty)
    check_vocab(lm, tokenizer)
    check_seq_len(cfg.data.seq_len, lm)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return lm


def setup_training(cfg: Any, session: StageSession, lm: torch.nn.Module, batching: tuple[int, int]) -> Training:
    model = ShapedLossLM(lm, cfg.loss)
    model, optimizer = session.prepare(model, lm, lambda m: build_adamw(m, cfg.optim, fused=torch.cuda.is_available()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.train.max_steps))
    if cfg.train.compile:
        model = torch.compile(model)
    micro_batch_size, grad_accum = batching
    return Training(lm, model, optimizer, scheduler, micro_batch_size, grad_accum)


def restore(training: Training, resume_from: Optional[Path], data: PretrainData, session: StageSession) -> None:
    """Optimizer, schedule, RNG and data position of the checkpoint being resumed (or the start of the data)."""
    if resume_from is None:
        data.train.seek(0)
        return
    state = ckpt.load_training_state(resume_from, session.accelerator, training.model, training.optimizer)
    training.scheduler.load_state_dict(state["scheduler"])
    training.step, training.nonfinite_skips = int(state["step"]), int(state.get("nonfinite_skips", 0))
    training.stopped_at = state.get("stopped_at")  # a run that reached train.stop_at trains no further
    saved_order = state.get("data_order")
    if saved_order != data.order_key and (saved_order or data.order_key):
        raise DataError(f"resume: {resume_from} was trained on other data or another data.seq_len than this run's "
                        f"data.path={session.cfg.data.path} data.seq_len={session.cfg.data.seq_len}, so its data "
                        "position means nothing here; resume with the data it was trained on, or start a new run")
    data.train.seek(int(state["data_position"]))


def announce(cfg: Any, session: StageSession, data: PretrainData, training: Training, stop_at: Optional[StopAt]) -> None:
    loss = cfg.loss
    session.say(f"ntp-rl {cfg.stage} -> {shown_path(session.run_dir.path)}")
    session.say(f"  data:  {data.description}; unigram baseline NLL {data.unigram_nll:.3f}")
    session.say(f"  model: {cfg.model.name} ({count_parameters(training.lm) / 1e6:.2f}M params) | loss: {loss.name} "
                f"(beta={loss.beta}, lambda_top={loss.lambda_top}, lambda_tail={loss.lambda_tail}, k={loss.k}, "
                f"{loss.positive_form.value}) | {session.world} process(es), grad accum {training.grad_accum}, "
                f"{session.device.type}")
    if cfg.stage == "midtrain":
        session.say(f"  from {cfg.model.name_or_path}: RoPE base {rope_theta_of(training.lm.config):g}, "
                    f"sequence length {cfg.data.seq_len}")
    if stop_at is not None:
        target = cfg.train.stop_at
        session.say(f"  stops at the first check (every {cfg.train.eval_every} steps from step {target.min_steps}) where {stop_at.accuracy_key} on "
                    f"{len(stop_at.problems)} {target.split} problems of task {stop_at.task.name} reaches "
                    f"{target.accuracy:g}, else at step {cfg.train.max_steps}")
    if training.step:
        session.say(f"  resumed from {session.resume_from} at step {training.step}")


# ---------------------------------------------------------------------------
# The loop


def train(cfg: Any, session: StageSession, data: PretrainData, training: Training, tracker: Tracker,
          stop_at: Optional[StopAt] = None) -> dict[str, float]:
    """Steps until train.max_steps, or until a check of train.stop_at reaches its accuracy; returns the last
    held-out metrics."""
    max_steps = cfg.train.max_steps
    speed = Throughput(cfg, session, training.lm)
    val_metrics: dict[str, float] = {}
    if training.step == 0:
        val_metrics = validate(cfg, session, data, training, tracker, step=0)
    bar = session.progress(total=max_steps, initial=training.step, logs=True)
    with stopping.checkpointing():  # SIGTERM: a checkpoint at the end of the step, then the run stops
        while training.step < max_steps and training.stopped_at is None:
            step_start = time.perf_counter()
            loss_sum, stat_sums, grad_norm = train_step(cfg, session, data, training, bar)
            step = training.step
            bar.update(1)
            kill_point("step", step)
            if step % cfg.train.log_every == 0 or step == max_steps:
                metrics = step_metrics(session, training, data, loss_sum, stat_sums, grad_norm, speed,
                                       time.perf_counter() - step_start)
                tracker.log(metrics, step=step)
                bar.set_postfix(**progress_fields(metrics))
            if step % cfg.train.eval_every == 0 or step == max_steps:
                val_metrics = validate(cfg, session, data, training, tracker, step)
                if stop_at is not None and step >= cfg.train.stop_at.min_steps:
                    check_stop_at(cfg, session, data, training, tracker, stop_at, step)
            saved = step % cfg.train.save_every == 0 or step == max_steps or training.stopped_at is not None
            if saved:
                save(cfg, session, data, training)
            stopping.stop_if_asked(session.accelerator, lambda: saved or save(cfg, session, data, training))
    bar.close()
    if stop_at is not None and training.stopped_at is None:
        session.notice("stop_at_not_reached", 1, f"train.stop_at.accuracy={cfg.train.stop_at.accuracy:g} was not reached "
                       f"in {max_steps} steps: the model is pre-trained for all of train.max_steps")
    if not val_metrics:  # resumed from the final checkpoint of a run that died before finishing
        val_metrics = validate(cfg, session, data, training, tracker, training.step)
    return val_metrics


def train_step(cfg: Any, session: StageSession, data: PretrainData, training: Training,
               bar: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on this process's share of the global batch; a non-finite one is skipped or stops the run."""
    accelerator, model = session.accelerator, training.model
    per_rank = cfg.train.batch_size // session.world
    batch = data.train.take(cfg.train.batch_size, rows=slice(session.rank * per_rank, (session.rank + 1) * per_rank))
    batch = batch.to(session.device)
    loss_sum = torch.zeros((), device=session.device)
    stat_sums = torch.zeros(len(STAT_NAMES), device=session.device)
    for micro, chunk in enumerate(batch.split(training.micro_batch_size)):
        # Gradients are averaged over processes only on the last micro-batch.
        sync = micro == training.grad_accum - 1
        with session.gradient_sync(model, sync):
            out = model(input_ids=chunk[:, :-1], labels=chunk[:, 1:])
            accelerator.backward(out.loss / training.grad_accum)
        loss_sum += out.loss.detach()
        stat_sums += torch.stack([out.stats[name] for name in STAT_NAMES])
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    finite = torch.isfinite(loss_sum) & torch.isfinite(grad_norm.float())
    all_finite = accelerator.reduce(finite.float(), reduction="sum").item() == session.world
    training.step += 1
    if all_finite:
        training.optimizer.step()
    else:
        training.nonfinite_skips += 1
        if (cfg.train.on_nonfinite is NonFinitePolicy.stop
                or training.nonfinite_skips > cfg.train.max_nonfinite_skips):
            session.stop_diverged(training.step, loss_sum / training.grad_accum, grad_norm, bar)
        session.say(f"  step {training.step}: non-finite loss or gradient, update skipped "
                    f"({training.nonfinite_skips} so far)")
    training.moe_metrics = moe.after_step(training.lm, lambda t: accelerator.reduce(t, reduction="sum"), all_finite)
    training.optimizer.zero_grad(set_to_none=True)
    training.scheduler.step()
    return loss_sum, stat_sums, grad_norm


class Throughput:
    """Tokens per step and model FLOPs per token, for tokens/s and MFU on the log lines."""

    def __init__(self, cfg: Any, session: StageSession, lm: torch.nn.Module):
        config = lm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_token = flops_per_token(count_parameters(lm, exclude_embeddings=True, active=True), config.num_hidden_layers,
                                               config.num_attention_heads, head_dim, cfg.data.seq_len)
        self.peak = peak_flops(session.device)
        self.world = session.world


def step_metrics(session: StageSession, training: Training, data: PretrainData, loss_sum: torch.Tensor,
                 stat_sums: torch.Tensor, grad_norm: torch.Tensor, speed: Throughput, elapsed: float) -> dict[str, float]:
    means = session.accelerator.reduce(torch.cat([loss_sum.view(1), stat_sums]) / training.grad_accum, reduction="mean")
    metrics = {"train/loss": means[0].item(), **{f"train/{n}": v.item() for n, v in zip(STAT_NAMES, means[1:])}}
    metrics["train/ppl"] = math.exp(min(metrics["train/nll"], 50.0))
    metrics |= {"train/lr": training.scheduler.get_last_lr()[0], "train/grad_norm": grad_norm.item(),
                "train/nonfinite_skips": training.nonfinite_skips,
                "perf/tokens_per_sec": speed.tokens_per_step / elapsed, "perf/step_time_s": elapsed,
                "perf/peak_mem_gib": peak_memory_gib(session.device),
                "perf/tokens_seen": training.step * speed.tokens_per_step, **training.moe_metrics}
    mixture = getattr(data.train, "tokens_by_source", None)  # data.sources: what each source has given so far
    if mixture is not None:
        metrics |= {f"data/{name}_tokens": tokens for name, tokens in mixture().items()}
    if speed.peak:
        metrics["perf/mfu"] = speed.flops_per_token * speed.tokens_per_step / elapsed / (speed.peak * speed.world)
    return metrics


def progress_fields(metrics: dict[str, float]) -> dict[str, str]:
    fields = {"loss": f"{metrics['train/loss']:.3f}", "nll": f"{metrics['train/nll']:.3f}",
              "ent": f"{metrics['train/entropy']:.3f}", "tok_s": f"{metrics['perf/tokens_per_sec']:.0f}"}
    if "perf/mfu" in metrics:
        fields["mfu"] = f"{metrics['perf/mfu']:.1%}"
    return fields


def validate(cfg: Any, session: StageSession, data: PretrainData, training: Training, tracker: Tracker,
             step: int) -> dict[str, float]:
    training.model.eval()
    metrics = held_out_metrics(training.model, data.val[: cfg.train.eval_sequences], training.micro_batch_size,
                               session.accelerator)
    training.model.train()
    tracker.log({f"val/{k}": v for k, v in metrics.items()} | {"val/unigram_nll": data.unigram_nll}, step=step)
    session.say(f"  val @ {step}: nll {metrics['nll']:.4f} (unigram {data.unigram_nll:.3f}) | ppl {metrics['ppl']:.3f} | "
                f"entropy {metrics['entropy']:.3f} | top-1 {metrics['accuracy']:.3f} | tail mass {metrics['tail_mass']:.4f}")
    return metrics


@torch.no_grad()
def held_out_metrics(model: torch.nn.Module, windows: torch.Tensor, micro_batch_size: int,
                     accelerator: Any) -> dict[str, float]:
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


def check_stop_at(cfg: Any, session: StageSession, data: PretrainData, training: Training, tracker: Tracker,
                  stop_at: StopAt, step: int) -> None:
    """Sample the held-out problems (every process its share of the calls) and mark the run stopped when
    avg@n reaches train.stop_at.accuracy. The check has its own seeds, as RL's held-out checks do, and leaves
    the training's random state as it found it."""
    from ntp_rl.engines import make_generator, sampling_weights
    from ntp_rl.evaluation import held_out_check
    from ntp_rl.generation import Sampling

    target = cfg.train.stop_at
    generator_cfg = GeneratorConfig()  # the trained model itself samples
    generator = make_generator(generator_cfg, training.lm, data.tokenizer, stop_at.task.stop_strings,
                               target.sampling.batch_size, "", session)
    sampling = Sampling(target.sampling.temperature, target.sampling.top_p, target.sampling.max_new_tokens)
    devices = [session.device] if session.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), sampling_weights(generator_cfg, training.model):
        summary = held_out_check(generator, stop_at.task, stop_at.problems, target.samples, sampling, [1], cfg.seed,
                                 session.rank, session.world, target.sampling.batch_size)
    training.model.train()
    accuracy = summary[stop_at.accuracy_key]
    tracker.log({f"val/task_{stop_at.accuracy_key}": accuracy}, step=step)
    session.say(f"  task @ {step}: {stop_at.accuracy_key} {accuracy:.3f} on {len(stop_at.problems)} {target.split} "
                f"problems (stop at {target.accuracy:g})")
    if accuracy >= target.accuracy:
        training.stopped_at = {"step": step, "metric": stop_at.accuracy_key, "value": accuracy,
                               "accuracy": target.accuracy, "split": target.split, "problems": len(stop_at.problems)}


def save(cfg: Any, session: StageSession, data: PretrainData, training: Training) -> Path:
    state = {"step": training.step, "data_position": data.train.position, "data_order": data.order_key, "scheduler": training.scheduler.state_dict(),
             "nonfinite_skips": training.nonfinite_skips, "world_size": session.world, "stopped_at": training.stopped_at}
    return ckpt.save_checkpoint(session.run_dir.checkpoints, training.step, session.accelerator, training.model,
                                lambda m: m.lm, training.optimizer, data.tokenizer, state, cfg.train.keep_last)


# ---------------------------------------------------------------------------
# Results


def finish(cfg: Any, session: StageSession, data: PretrainData, training: Training, val_metrics: dict[str, float],
           wall: float) -> dict:
    step, tokens_per_step = training.step, cfg.train.batch_size * cfg.data.seq_len
    final = ckpt.latest_checkpoint(session.run_dir.checkpoints)
    results = {"stage": cfg.stage, "step": step, "checkpoint": str(final), "unigram_nll": data.unigram_nll,
               "val": val_metrics, "train_wall_time_s": wall, "tokens": step * tokens_per_step,
               "num_processes": session.world, "loss": OmegaConf.to_container(cfg.loss, resolve=True, enum_to_str=True)}
    if cfg.train.stop_at.accuracy is not None:  # null when max_steps came first
        results["stopped_at"] = training.stopped_at
    session.tracker.summary({f"final/val_{k}": v for k, v in val_metrics.items()})
    session.finish(results, step=step, checkpoint=str(final))
    if (stopped := training.stopped_at) is not None:
        session.say(f"  stopped at step {step} of {cfg.train.max_steps}: {stopped['split']} {stopped['metric']} "
                    f"{stopped['value']:.3f} >= train.stop_at.accuracy={stopped['accuracy']:g}")
    session.say(f"done: {step} steps in {wall:.0f}s | val nll {val_metrics['nll']:.4f} vs unigram {data.unigram_nll:.3f}"
                f" | ppl {val_metrics['ppl']:.3f} | entropy {val_metrics['entropy']:.3f}\n  model: {shown_path(final)}")
    return results
