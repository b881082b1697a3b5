"""Sample-based metrics shared by `rl` (held-out checks) and `eval`."""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as a running product, 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms
    the huge binomials (n = 128, k = 64 would overflow a float).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_vote(answers: Sequence[Optional[str]]) -> Optional[str]:
    """The most common extracted answer (None = no answer, never a candidate).

    Ties go to the answer that appeared first among the samples, so the vote is a pure
    function of the samples in order.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


class Sums:
    """Named running sums (and maxima) in one tensor each, so that all of them are reduced over
    processes in one call each."""

    def __init__(self, names: Sequence[str], device: Any = "cpu", maxima: Sequence[str] = ()):
        import torch

        self.names = tuple(names)
        self.values = torch.zeros(len(self.names), device=device)
        self.maxima_names = tuple(maxima)
        self.maxima = torch.full((len(self.maxima_names),), float("-inf"), device=device)

    def add(self, **values: Any) -> None:
        for name, value in values.items():
            self.values[self.names.index(name)] += value

    def maximum(self, **values: Any) -> None:
        import torch

        for name, value in values.items():
            i = self.maxima_names.index(name)
            self.maxima[i] = torch.maximum(self.maxima[i], torch.as_tensor(value, dtype=self.maxima.dtype))

    def merge(self, other: "Sums") -> None:
        """Add another set of the same sums (and take the larger maxima)."""
        import torch

        self.values += other.values
        self.maxima = torch.maximum(self.maxima, other.maxima)

    def __getitem__(self, name: str) -> Any:
        return self.values[self.names.index(name)]

    def totals(self, accelerator: Any) -> dict[str, float]:
        """Each sum over every process, and each maximum over every process (-inf where nothing was seen)."""
        totals = dict(zip(self.names, accelerator.reduce(self.values, "sum").tolist()))
        if self.maxima_names:
            gathered = accelerator.gather(self.maxima[None]) if accelerator.num_processes > 1 else self.maxima[None]
            totals |= dict(zip(self.maxima_names, gathered.max(dim=0).values.tolist()))
        return totals
