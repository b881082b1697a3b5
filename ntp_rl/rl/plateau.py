"""rl.plateau: RL that ends once held-out accuracy has levelled off, instead of after a fixed step count.

The rule is early stopping as Keras and Lightning define it (min_delta, patience), read in steps: an
evaluation improves when it beats the best so far by more than `min_gain`; the run stops at the first
evaluation, from `min_steps` on, that comes `patience` or more steps after the last improvement. It reads
only the held-out checks RL already makes (rl.eval_split, every rl.eval_every steps), so the same curve
always gives the same stopping step, whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Plateau:
    patience: int  # steps without an improvement of more than min_gain
    min_gain: float
    min_steps: int = 0  # never stop before this step
    best: Optional[float] = None  # the last improvement: its value and step
    best_step: int = 0

    def levelled_off(self, step: int, value: float) -> bool:
        """Record the evaluation at `step`; True when the run should stop there."""
        if self.best is None or value > self.best + self.min_gain:
            self.best, self.best_step = value, step
            return False
        return step >= self.min_steps and step - self.best_step >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step}

    def load_state_dict(self, saved: dict) -> None:
        self.best, self.best_step = saved["best"], int(saved["best_step"])

    def replay(self, curve: list[tuple[int, float]]) -> Optional[int]:
        """Take in a logged curve of (step, held-out accuracy), in step order, as if the rule had read it: for a
        run continued with the rule from a checkpoint saved without it. Returns the step where the rule would
        have stopped that curve, if it would have."""
        return next((step for step, value in curve if self.levelled_off(step, value)), None)


def stopping_step(curve: list[tuple[int, float]], patience: int, min_gain: float, min_steps: int = 0) -> Optional[int]:
    """Where the rule stops a logged curve of (step, held-out accuracy), in step order; None: it never does."""
    return Plateau(patience, min_gain, min_steps).replay(curve)
