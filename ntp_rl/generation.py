"""Sampling completions: the one place `rl` rollouts and `eval` samples come from.

`Generator` is the interface the stages use; `HFGenerator` implements it with
transformers' `generate` (KV cache, left padding, EOS and stop strings). A vLLM backend
for GPU scale would be another class with the same `generate` method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64


@dataclass
class Completion:
    prompt_index: int  # which prompt of the call this answers
    text: str  # decoded response, cut at the first stop string
    token_ids: list[int]  # response tokens as sampled, up to and including EOS when it ended there
    truncated: bool  # hit max_new_tokens without EOS or a stop string
    logprobs: list[float] | None = None  # the engine's log-prob of each token in token_ids (after temperature/top-p); None when the generator gives none


class Generator(Protocol):
    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling, seed: int) -> list[list[Completion]]:
        """n completions for each prompt, [prompt][sample]; the same seed gives the same samples."""
        ...


class HFGenerator:
    """Batched sampling with `model.generate`; `batch_size` counts sequences (prompts x n)."""

    def __init__(self, model: Any, tokenizer: Any, stop_strings: Sequence[str] = (), batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling, seed: int) -> list[list[Completion]]:
        tok = self.tokenizer
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        jobs = [(i, s) for i in range(len(prompts)) for s in range(n)]
        results: list[list[Completion]] = [[] for _ in prompts]
        per_batch = max(1, self.batch_size)
        padding_side = tok.padding_side
        tok.padding_side = "left"  # decoder-only models continue from the last real token
        try:
            for b, start in enumerate(range(0, len(jobs), per_batch)):
                batch = jobs[start:start + per_batch]
                enc = tok([prompts[i] for i, _ in batch], return_tensors="pt", padding=True, add_special_tokens=False)
                enc = {k: v.to(device) for k, v in enc.items()}
                # One seed per batch: the samples depend on (seed, batch), not on what ran before.
                torch.manual_seed(seed * 100_003 + b)
                out = model.generate(
                    **enc,
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature if sampling.temperature > 0 else None,
                    top_p=sampling.top_p if sampling.temperature > 0 else None,
                    top_k=None,
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    stop_strings=list(self.stop_strings) or None,
                    tokenizer=tok if self.stop_strings else None,
                )
                new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
                for (prompt_index, _), ids in zip(batch, new_tokens):
                    results[prompt_index].append(self._completion(prompt_index, ids, eos, pad, sampling.max_new_tokens))
        finally:
            tok.padding_side = padding_side
            model.train(was_training)
        return results

    def _completion(self, prompt_index: int, ids: list[int], eos: int, pad: int, max_new: int) -> Completion:
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
            ended = True
        else:
            while ids and ids[-1] == pad:  # padding after a stop string ended this row early
                ids = ids[:-1]
            ended = len(ids) < max_new
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut != -1:
                text, ended = text[:cut], True
        return Completion(prompt_index=prompt_index, text=text, token_ids=ids, truncated=not ended)
