"""The next-token distribution on held-out text: how sure a model is, and where it branches.

Per token, from the logits: the target's NLL, the entropy of the predicted distribution,
the target's rank among all tokens (1 = the model's top choice), and the mass on the k
likeliest tokens (the rest is the tail the shaped loss rewards or penalises). Tokens whose
entropy is above a threshold are "forking" tokens: the places where sampled continuations
split. Everything is kept as sums and fixed-bin counts, so the shares of several processes
add up with one all-reduce and the result does not depend on how the text was split.

The per-token values come from `losses.token_statistics`, the same code that computes the
statistics the training loss logs as means.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ntp_rl.losses import token_statistics

# The state's layout: the token count, then these sums (means once divided by the count),
# then the entropy histogram, then how often each target rank occurred.
_TOKEN_SUMS = ("nll", "entropy", "accuracy", "target_prob", "topk_mass", "target_rank", "forking")


class TextDiagnostics:
    """Accumulates per-token statistics of next-token predictions; `add` logits, then `result()`."""

    def __init__(self, vocab_size: int, k: int, forking_threshold: float, bins: int, device: Any = "cpu"):
        if not 1 <= k <= vocab_size:
            raise ValueError(f"k must be in 1..{vocab_size}, not {k}")
        self.vocab_size = vocab_size
        self.k = k
        self.forking_threshold = forking_threshold
        self.bins = bins
        self.max_entropy = math.log(vocab_size)  # a uniform distribution's
        # float64: counts stay exact far beyond what float32 holds (2**24 tokens).
        self.state = torch.zeros(1 + len(_TOKEN_SUMS) + bins + vocab_size + 1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024) -> None:
        """logits [tokens, V] (any dtype), targets [tokens]; fp32 one chunk of tokens at a time."""
        for start in range(0, targets.numel(), chunk_size):
            stats = token_statistics(logits[start:start + chunk_size], targets[start:start + chunk_size], self.k)
            entropy, rank = stats["entropy"], stats["target_rank"]
            sums = torch.stack([
                stats["nll"].sum(), entropy.sum(), (rank == 1).sum(), stats["target_prob"].sum(),
                stats["topk_mass"].sum(), rank.sum(), (entropy > self.forking_threshold).sum(),
            ]).double()
            # histc drops values outside [min, max]; a uniform row's entropy can round a hair above log V.
            hist = torch.histc(entropy.float().clamp(0.0, self.max_entropy), bins=self.bins, min=0.0,
                               max=self.max_entropy).double()
            ranks = torch.bincount(rank, minlength=self.vocab_size + 1).double()
            self.state += torch.cat([torch.tensor([float(rank.numel())], dtype=torch.float64, device=sums.device),
                                     sums, hist, ranks]).to(self.state.device)

    def result(self) -> dict[str, Any]:
        """Token means, rank quantiles, the forking share and the entropy histogram."""
        state = self.state.cpu()
        tokens = state[0].item()
        sums = dict(zip(_TOKEN_SUMS, (state[1:1 + len(_TOKEN_SUMS)] / max(tokens, 1.0)).tolist()))
        hist = state[1 + len(_TOKEN_SUMS):1 + len(_TOKEN_SUMS) + self.bins]
        rank_counts = state[1 + len(_TOKEN_SUMS) + self.bins:]
        edges = torch.linspace(0.0, self.max_entropy, self.bins + 1)
        return {
            "tokens": int(tokens),
            "nll": sums["nll"],
            "ppl": math.exp(min(sums["nll"], 50.0)),
            "entropy": sums["entropy"],
            "accuracy": sums["accuracy"],  # the target is the top choice
            "target_prob": sums["target_prob"],
            "topk_mass": sums["topk_mass"],
            "tail_mass": 1.0 - sums["topk_mass"],
            "k": self.k,
            "target_rank_mean": sums["target_rank"],
            "target_rank_median": _quantile_of_counts(rank_counts, 0.5),
            "target_rank_p90": _quantile_of_counts(rank_counts, 0.9),
            "target_in_topk": rank_counts[1:self.k + 1].sum().item() / max(tokens, 1.0),
            "forking_share": sums["forking"],
            "forking_threshold": self.forking_threshold,
            "entropy_histogram": {"edges": edges.tolist(), "counts": [int(c) for c in hist.tolist()]},
        }


def _quantile_of_counts(counts: torch.Tensor, q: float) -> int:
    """The smallest value v with at least a share q of the observations <= v; counts[v] = how often v occurred."""
    total = counts.sum().item()
    if total == 0:
        return 0
    cumulative = counts.cumsum(0)
    return int(torch.searchsorted(cumulative, torch.tensor(q * total, dtype=cumulative.dtype)).item())
