#!/usr/bin/env python
"""Forward+backward time and peak extra memory of the shaped loss against F.cross_entropy.

Every variant starts from the same hidden states [N, H] and LM head weight [V, H] and
produces gradients for both, so the LM head GEMMs are part of every figure:

  ce            logits = h @ W.T materialised, .float(), F.cross_entropy   (the baseline)
  naive/<s>     logits materialised, the autograd reference of the shaped loss
  chunked/<s>   logits materialised, the shaped loss in fp32 chunks (ntp_rl.losses.shaped_ntp_loss)
  fused/<s>     no logits: LM head + shaped loss chunk by chunk (shaped_ntp_loss_fused)
  compiled/<s>  fused, each chunk's loss through torch.compile (loss.compile=true)

for the settings <s> = precision (beta=-0.25) and tail_penalty (lambda_tail=-0.1, k=100).
Time is the median over --repeats runs; memory is the peak above the inputs during one
step after a warm-up step (which also compiles). CUDA allocator stats on GPU; on CPU each
variant runs in its own process, with glibc told to return large blocks on free, and the
peak RSS above its inputs is read from /proc. Prints one line per variant and the ratios.

  python scripts/bench_loss.py --tokens 2048 --hidden 256 --vocab 32000          # CPU
  python scripts/bench_loss.py --tokens 8192 --hidden 2048 --vocab 151936 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F

import peak_memory
from ntp_rl.losses import RewardShaping, shaped_ntp_loss, shaped_ntp_loss_fused, shaped_ntp_loss_reference

SETTINGS = {
    "precision": RewardShaping(beta=-0.25),
    "tail_penalty": RewardShaping(lambda_tail=-0.1, k=100),
}
VARIANTS = ["ce"] + [f"{path}/{name}" for path in ("naive", "chunked", "fused", "compiled") for name in SETTINGS]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden ** -0.5).to(args.device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=gen).to(args.device)
    return hidden, weight, labels


def step(variant: str, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> None:
    path, _, setting = variant.partition("/")
    if path in ("fused", "compiled"):
        loss = shaped_ntp_loss_fused(hidden, weight, labels, SETTINGS[setting], chunk_size=chunk_size,
                                     compile=path == "compiled").loss
    else:
        logits = hidden @ weight.t()
        if path == "ce":
            loss = F.cross_entropy(logits.float(), labels)
        elif path == "naive":
            loss = shaped_ntp_loss_reference(logits, labels, SETTINGS[setting]).loss
        else:
            loss = shaped_ntp_loss(logits, labels, SETTINGS[setting], chunk_size=chunk_size).loss
    loss.backward()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variant: str, args: argparse.Namespace) -> dict:
    hidden, weight, labels = make_inputs(args)
    cuda = args.device.startswith("cuda")
    step(variant, hidden, weight, labels, args.chunk_size)
    hidden.grad = weight.grad = None
    gc.collect()
    base = peak_memory.start(cuda)
    step(variant, hidden, weight, labels, args.chunk_size)
    sync(args.device)
    peak = peak_memory.extra_since(base, cuda)
    hidden.grad = weight.grad = None

    for _ in range(args.warmup - 1):
        step(variant, hidden, weight, labels, args.chunk_size)
        hidden.grad = weight.grad = None
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        step(variant, hidden, weight, labels, args.chunk_size)
        sync(args.device)
        times.append(time.perf_counter() - start)
        hidden.grad = weight.grad = None
    return {"variant": variant, "ms": statistics.median(times) * 1e3, "extra_gib": peak / 2**30}


def measure_isolated(variant: str, args: argparse.Namespace) -> dict:
    """On CPU freed memory stays in the process, so each variant gets a fresh one."""
    return peak_memory.run_isolated(__file__, ["--only", variant] + [
        f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "only" and v is not None
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="steps before timing (>= 1; the first also compiles)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--only", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    if args.warmup < 1:
        parser.error("--warmup: must be >= 1 (the memory is measured after a warm-up step)")
    wanted = args.variants.split(",")
    unknown = sorted(set(wanted) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# N={args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype}, chunk {args.chunk_size}, "
          f"{device_name}, torch {torch.__version__}, median of {args.repeats}")
    rows = {}
    for variant in wanted:
        rows[variant] = measure(variant, args) if args.device.startswith("cuda") else measure_isolated(variant, args)
        r = rows[variant]
        print(f"{variant:<24} {r['ms']:9.1f} ms   {r['extra_gib']:8.3f} GiB extra", flush=True)

    if "ce" not in rows:
        return
    ce = rows["ce"]
    print("# ratios: time vs ce, memory vs naive of the same setting (goal: chunked or fused <= 0.25x naive memory at <= 1.5x ce time)")
    for variant, r in rows.items():
        path, _, setting = variant.partition("/")
        naive = rows.get(f"naive/{setting}")
        mem = f"{r['extra_gib'] / naive['extra_gib']:.2f}x naive" if naive and naive["extra_gib"] > 0 and path != "naive" else ""
        print(f"{variant:<24} {r['ms'] / ce['ms']:6.2f}x ce time   {mem}")


if __name__ == "__main__":
    main()
