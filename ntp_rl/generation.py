"""Sampling completions: the one place `rl` rollouts and `eval` samples come from.

`Generator` is the interface the stages use, and `ntp_rl.engines.make_generator` picks one from the
config (`generator=hf|vllm`): `HFGenerator` samples with transformers' `generate` (KV cache, left
padding, EOS and stop strings) on the trained model itself; `VLLMGenerator`
(ntp_rl/vllm_engine.py) with a vLLM engine in the same process, which `sync_weights` keeps
on the trainer's current weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import torch

from ntp_rl.seeding import generate_batch_seed


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

    def sync_weights(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        """Sample from the (Hugging Face-named) weights `weights()` gives from now on; a generator
        that samples with the trained model itself does nothing (and never calls it)."""
        ...

    def release_memory(self) -> None:
        """Free what the engine holds while the trainer updates (vLLM's sleep mode on GPU); a no-op otherwise."""
        ...


class HFGenerator:
    """Batched sampling with `model.generate`; `batch_size` counts sequences (prompts x n)."""

    def __init__(self, model: Any, tokenizer: Any, stop_strings: Sequence[str] = (), batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.batch_size = batch_size
        self._stop_criterion: Any = None  # built on first use: it indexes the tokenizer's vocabulary

    def sync_weights(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        """Nothing to do: it samples with the trained model itself."""

    def release_memory(self) -> None:
        """Nothing to do: the model is the trainer's."""

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
                torch.manual_seed(generate_batch_seed(seed, b))
                out = self._sample(enc, sampling, eos, pad)
                prompt_len = enc["input_ids"].shape[1]
                ends = self._sampled_lengths(out, prompt_len, eos)
                for (prompt_index, _), ids, end in zip(batch, out[:, prompt_len:].tolist(), ends):
                    results[prompt_index].append(self._completion(prompt_index, ids[:end], ended=end is not None))
        finally:
            tok.padding_side = padding_side
            model.train(was_training)
        return results

    def _sample(self, enc: dict[str, torch.Tensor], sampling: Sampling, eos: int, pad: int) -> torch.Tensor:
        """`generate` with exactly these settings: softmax(z / T) with top-p, or greedy at T = 0.

        `generate` fills every setting it is not given from the model's generation_config, and
        a hub model's may carry a repetition penalty, a minimum length, banned words, top-k, more
        EOS ids...: any of them would sample from another distribution than the one the policy
        loss scores. So the model's is set aside for the call, and top_k is 0 (off) explicitly:
        transformers' own default is 50.
        """
        from transformers import GenerationConfig

        sample = sampling.temperature > 0
        settings = GenerationConfig(
            do_sample=sample, temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0, top_k=0 if sample else None,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            stop_strings=list(self.stop_strings) or None)
        model, checkpoint_settings = self.model, self.model.generation_config
        model.generation_config = GenerationConfig()
        try:
            # synced_gpus=False: transformers turns it on for an FSDP model, stepping every process until all are
            # done (an all_reduce per token), which hangs when processes make different numbers of calls; under
            # FSDP the stages gather the weights first (sharding.full_weights), so a forward needs no other process.
            return model.generate(**enc, generation_config=settings, synced_gpus=False,
                                  tokenizer=self.tokenizer if self.stop_strings else None)
        finally:
            model.generation_config = checkpoint_settings

    def _sampled_lengths(self, out: torch.Tensor, prompt_len: int, eos: int) -> list[Optional[int]]:
        """How many tokens of each row were sampled: up to and including its EOS or the token that
        completed a stop string (None: it ran to max_new_tokens).

        What follows is padding, which may be the EOS token itself (pad = EOS in Qwen-style
        tokenizers), so it is told apart by replaying `generate`'s own stopping rules on each
        prefix, not by looking for EOS.
        """
        new = out[:, prompt_len:]
        stopped = new == eos
        if self.stop_strings:
            if self._stop_criterion is None:
                from transformers import StopStringCriteria

                self._stop_criterion = StopStringCriteria(self.tokenizer, list(self.stop_strings))
            for t in range(new.shape[1]):
                stopped[:, t] |= self._stop_criterion(out[:, :prompt_len + t + 1], None)
        first = stopped.int().argmax(dim=1)
        return [int(f) + 1 if row_stopped else None for f, row_stopped in zip(first.tolist(), stopped.any(dim=1).tolist())]

    def _completion(self, prompt_index: int, ids: list[int], ended: bool) -> Completion:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut != -1:
                text = text[:cut]
        return Completion(prompt_index=prompt_index, text=text, token_ids=ids, truncated=not ended)
