"""Verifiable tasks behind one registry: what `rl` trains on and `eval` measures.

A task is a small object: problems (a prompt and a ground-truth answer), a way to pull the
final answer out of a completion, and a reward (1.0 right / 0.0 wrong, plus an optional
format bonus). Tasks are registered by `kind`; a config (conf/task/*.yaml) picks one:

    embedded        the procedural corpus's held-out splits (ntp_rl/data/corpus.py)
    (more kinds are registered by their modules: see KINDS)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from ntp_rl.errors import ConfigError

# Splits a task serves: RL trains on "train", eval measures on "test". For the embedded
# task both are disjoint from the pre-training text.
TASK_SPLITS = ("train", "test")


@dataclass(frozen=True)
class TaskProblem:
    id: str
    prompt: str  # exactly what the model is conditioned on
    answer: str  # the ground truth, canonical form
    meta: dict = field(default_factory=dict, compare=False)


class Task(Protocol):
    name: str
    stop_strings: Sequence[str]  # generation stops at the first of these (EOS always stops it)

    def problems(self, split: str, n: int) -> list[TaskProblem]:
        """The first n problems of a split, the same every time for the same config."""
        ...

    def extract_answer(self, completion: str) -> Optional[str]:
        """The final answer a completion gives, canonicalised, or None when it gives none."""
        ...

    def answer_matches(self, answer: str, problem: TaskProblem) -> bool:
        """Whether an extracted answer is the problem's ground truth (equivalence, not only equality)."""
        ...


def is_correct(task: Task, completion: str, problem: TaskProblem) -> bool:
    answer = task.extract_answer(completion)
    return answer is not None and task.answer_matches(answer, problem)


def reward(task: Task, completion: str, problem: TaskProblem, format_weight: float = 0.0) -> float:
    """1.0 for a right answer, 0.0 otherwise, plus `format_weight` when any answer could be extracted."""
    answer = task.extract_answer(completion)
    correct = answer is not None and task.answer_matches(answer, problem)
    return float(correct) + (format_weight if answer is not None else 0.0)


# kind -> factory(task_cfg) -> Task
KINDS: dict[str, Callable[[Any], Task]] = {}


def register(kind: str) -> Callable:
    def wrap(factory: Callable[[Any], Task]) -> Callable[[Any], Task]:
        KINDS[kind] = factory
        return factory

    return wrap


def build_task(task_cfg: Any) -> Task:
    # Importing the modules registers their kinds; optional dependencies load only when used.
    from ntp_rl.tasks import embedded  # noqa: F401

    kind = getattr(task_cfg.kind, "value", task_cfg.kind)
    if kind not in KINDS:
        raise ConfigError("task.kind", f"unknown task kind; choose one of: {', '.join(sorted(KINDS))}", kind)
    return KINDS[kind](task_cfg)
