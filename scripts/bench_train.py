#!/usr/bin/env python
"""Training throughput: the `pretrain` stage against a plain transformers + F.cross_entropy loop.

Both train the same freshly initialised model on the same packed batches with the same
AdamW and clipping; the plain loop is the floor the stage is measured against (what a
researcher would write by hand). Tokens/s are medians over the steps after --warmup.
On GPU both run under bf16 autocast and the MFU of each is printed too.

  python scripts/bench_train.py --steps 30                                 # tiny model, CPU
  python scripts/bench_train.py --steps 30 --model dense_1b --seq-len 4096 --batch-size 8 --micro-batch-size 1
  python scripts/bench_train.py --loss precision tail_penalty              # more stage variants
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ntp_rl.config.compose import compose  # noqa: E402
from ntp_rl.models import build_model, count_parameters  # noqa: E402
from ntp_rl.optim import build_adamw  # noqa: E402
from ntp_rl.runtime import flops_per_token, peak_flops  # noqa: E402
from ntp_rl.stages import run_stage  # noqa: E402
from ntp_rl.tracking import read_metrics  # noqa: E402


def stage_tokens_per_sec(overrides: list[str], warmup: int) -> list[float]:
    cfg = compose("pretrain", overrides)
    run_stage("pretrain", cfg, overrides)
    rows = [r for r in read_metrics(Path(cfg.run_dir)) if "perf/tokens_per_sec" in r]
    return [r["perf/tokens_per_sec"] for r in rows if r["step"] > warmup]


def plain_loop_tokens_per_sec(overrides: list[str], steps: int, warmup: int) -> list[float]:
    """The same model, data and optimizer, trained the way the transformers docs show."""
    from ntp_rl.data import build_pretrain_data

    cfg = compose("pretrain", overrides)
    torch.manual_seed(cfg.seed)
    data = build_pretrain_data(cfg.data, cache_dir=Path(cfg.data.cache_dir), seed=cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg.model, len(data.tokenizer), data.tokenizer.pad_token_id, data.tokenizer.eos_token_id).to(device)
    optimizer = build_adamw(model, cfg.optim, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    accum = cfg.train.batch_size // cfg.train.micro_batch_size
    data.train.seek(0)
    rates = []
    for step in range(1, steps + 1):
        start = time.perf_counter()
        batch = data.train.take(cfg.train.batch_size).to(device)
        for chunk in batch.split(cfg.train.micro_batch_size):
            with autocast:
                logits = model(input_ids=chunk[:, :-1]).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > warmup:
            rates.append(cfg.train.batch_size * cfg.data.seq_len / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--loss", nargs="+", default=["ce", "precision"], help="loss presets to run the stage with")
    parser.add_argument("--compile", action="store_true", help="torch.compile in the stage (train.compile=true)")
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for both loops")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench_train-"))
    common = [f"model={args.model}", f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}",
              f"train.micro_batch_size={args.micro_batch_size}", f"train.max_steps={args.steps}",
              "train.log_every=1", f"train.eval_every={10**6}", f"train.save_every={10**6}", "train.eval_sequences=1",
              "logger.wandb.mode=disabled", "logger.progress_bar=false", f"out_dir={workdir}",
              f"data.cache_dir={REPO / 'outputs' / 'cache'}", f"train.compile={str(args.compile).lower()}", *args.extra]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# model {args.model}, {args.batch_size} x {args.seq_len} tokens/step, {args.steps} steps "
          f"(median after {args.warmup}), {name}, torch {torch.__version__}")

    cfg = compose("pretrain", common)
    lm = build_model(cfg.model, 512, 0, 1)
    flops = flops_per_token(count_parameters(lm, exclude_embeddings=True), lm.config.num_hidden_layers,
                            lm.config.num_attention_heads, lm.config.head_dim, args.seq_len)
    peak = peak_flops(device)
    del lm

    plain = "plain transformers + F.cross_entropy"
    results: dict[str, list[float]] = {plain: []}
    # Rounds interleave the variants, so a slow spell on a shared machine hits all of them.
    for round_ in range(args.rounds):
        results[plain] += plain_loop_tokens_per_sec(common, args.steps, args.warmup)
        for loss in args.loss:
            run_dir = workdir / f"stage-{loss}-{round_}"
            results.setdefault(f"ntp-rl pretrain loss={loss}", []).extend(
                stage_tokens_per_sec([*common, f"loss={loss}", f"run_dir={run_dir}"], args.warmup))
    base = statistics.median(results[plain])
    for label, rates in results.items():
        rate = statistics.median(rates)
        mfu = f"   MFU {flops * rate / peak:.1%}" if peak else ""
        print(f"{label:<40} {rate:10.0f} tokens/s   {rate / base:5.2f}x plain{mfu}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    main()
