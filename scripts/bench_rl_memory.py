#!/usr/bin/env python
"""Extra peak memory of one RL update against response length: materialised logits vs the chunked head.

One sequence of --prompt prompt tokens and T response tokens, a Qwen3 of --layers layers (1) with
the given vocabulary, fp32 unless --dtype bf16. "One RL update" is the stage's own code
(`ntp_rl.stages.rl_update.update_minibatch`): a forward of the policy, its per-token log-probs at
the sampling temperature and the entropy, the clipped surrogate, and the backward into every
parameter. Two paths:

  materialised  the model's full logits, an fp32 log-softmax of the response rows (what rl did before)
  chunked       the response rows' hidden states through the LM head a chunk at a time
                (ntp_rl.lm_head.token_logprobs_fused, rl.logprob_chunk_size)

The memory is the peak above what is held before the update (the model and its inputs),
measured as scripts/bench_loss.py does (each path in a process of its own on CPU). The
largest absolute difference between the two paths' losses and gradients is printed beside it.

  python scripts/bench_rl_memory.py --vocab 151936 --tokens 1024,4096
  python scripts/bench_rl_memory.py --vocab 151936 --tokens 16384 --paths chunked --json
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

import peak_memory
from ntp_rl.config.schema import GRPOConfig
from ntp_rl.generation import Sampling
from ntp_rl.metrics import Sums
from ntp_rl.rl.rollout import Group, PolicyLogprobs, build_batch
from ntp_rl.stages import rl_update

PATHS = ("materialised", "chunked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_model(args: argparse.Namespace, tokens: int) -> torch.nn.Module:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=args.hidden // 2, max_position_embeddings=args.prompt + tokens,
                         tie_word_embeddings=False)
    lm = Qwen3ForCausalLM(config).to(args.device, DTYPES[args.dtype])
    if args.gradient_checkpointing:  # as rl.gradient_checkpointing=true sets it up
        lm.gradient_checkpointing_enable()
        lm.train()
    return lm


def make_batch(args: argparse.Namespace, tokens: int):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.prompt + tokens,), generator=gen).tolist()
    group = Group("p", ids[:args.prompt], [ids[args.prompt:], ids[args.prompt:]], [1.0, 0.0], [True, False],
                  [False, False])
    # Two samples of one prompt make a group; the update takes the first row only (batch 1).
    return build_batch([group], torch.tensor([[1.0, -1.0]]), pad_id=0, mask_truncated=False).rows(0, 1).to(args.device)


def update(model: PolicyLogprobs, batch, args: argparse.Namespace) -> torch.Tensor:
    from accelerate import Accelerator

    rl = GRPOConfig(num_mini_batches=1, micro_batch_size=1, logprob_chunk_size=args.chunk_size)
    state = SimpleNamespace(cfg=SimpleNamespace(rl=rl), model=model, lm=model.lm, reference=None,
                            sampling=Sampling(args.temperature, 1.0, batch.input_ids.shape[1]), separate_old_pass=False,
                            session=SimpleNamespace(accelerator=Accelerator(cpu=args.device == "cpu"), world=1,
                                                    device=torch.device(args.device),
                                                    gradient_sync=lambda model, sync: nullcontext()))
    sums = Sums(rl_update.STEP_SUMS, device=args.device, maxima=rl_update.STEP_MAXIMA)
    rl_update.update_minibatch(state, batch, sums)
    return sums["loss"]


def measure(path: str, tokens: int, args: argparse.Namespace) -> dict:
    """One path at one length: the extra peak memory of an update; its loss and gradients go to --save."""
    lm = make_model(args, tokens)
    model = PolicyLogprobs(lm, args.chunk_size)
    model.chunked = path == "chunked"
    batch = make_batch(args, tokens)
    cuda = args.device.startswith("cuda")
    update(model, batch, args)  # warm-up: lazy initialisation and the allocator's first growth
    lm.zero_grad(set_to_none=True)
    gc.collect()
    base = peak_memory.start(cuda)
    loss = update(model, batch, args)
    extra = peak_memory.extra_since(base, cuda)
    torch.save({"loss": loss.cpu(), **{n: p.grad.cpu() for n, p in lm.named_parameters()}}, args.save)
    return {"path": path, "tokens": tokens, "extra_gib": extra / 2**30}


def max_abs_diff(a: Path, b: Path) -> float:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1024,4096", help="comma-separated response lengths")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="as rl.gradient_checkpointing=true")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before the response")
    parser.add_argument("--chunk-size", type=int, default=GRPOConfig.logprob_chunk_size)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of: " + ", ".join(PATHS))
    parser.add_argument("--json", action="store_true", help="one JSON object per length")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        lengths = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        parser.error(f"--tokens: comma-separated integers, not {args.tokens!r}")
    if any(t < 1 for t in lengths):
        parser.error("--tokens: every length must be >= 1")
    paths = args.paths.split(",")
    if set(paths) - set(PATHS):
        parser.error(f"--paths: choose from {', '.join(PATHS)}")

    if args.only:
        print(json.dumps(measure(args.only, lengths[0], args)))
        return
    if not args.json:
        print(f"# one RL update, batch 1, prompt {args.prompt} tokens, {args.layers} layer(s), hidden {args.hidden}, "
              f"vocab {args.vocab}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
              f"{args.dtype}, chunk {args.chunk_size}, {args.device}, torch {torch.__version__}")
        print(f"# {'tokens':>7} {'materialised GiB':>17} {'chunked GiB':>12} {'max abs diff':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in lengths:
            row = {"tokens": tokens, "materialised_gib": None, "chunked_gib": None, "max_abs_diff": None}
            saved = {}
            for path in paths:
                saved[path] = Path(tmp) / f"{path}-{tokens}.pt"
                flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                         if k not in ("only", "save", "tokens", "paths", "json", "gradient_checkpointing") and v is not None]
                flags += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
                flags += [f"--tokens={tokens}", f"--only={path}", f"--save={saved[path]}"]
                if args.device.startswith("cuda"):
                    args_ns = argparse.Namespace(**{**vars(args), "save": saved[path]})
                    result = measure(path, tokens, args_ns)
                    torch.cuda.empty_cache()
                else:
                    result = peak_memory.run_isolated(__file__, flags)
                row[f"{path}_gib"] = round(result["extra_gib"], 3)
            if len(saved) == 2:
                row["max_abs_diff"] = max_abs_diff(*saved.values())
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                shown = {k: "-" if v is None else f"{v:.3f}" if k.endswith("gib") else f"{v:.2e}"
                         for k, v in row.items() if k != "tokens"}
                print(f"  {tokens:>7} {shown['materialised_gib']:>17} {shown['chunked_gib']:>12} "
                      f"{shown['max_abs_diff']:>13}", flush=True)


if __name__ == "__main__":
    main()
