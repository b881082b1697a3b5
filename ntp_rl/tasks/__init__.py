"""Verifiable tasks behind one registry: what `rl` trains on and `eval` measures.

A task is a small object: problems (a prompt and a ground-truth answer), a way to pull the
final answer out of a completion, and a reward (1.0 right / 0.0 wrong, plus an optional
format bonus). Tasks are registered by `kind`; a config (conf/task/*.yaml) picks one:

    embedded        the procedural corpus's held-out splits (ntp_rl/data/corpus.py)
    reasoning_gym   procedural datasets generated and scored offline by reasoning-gym
    hf_math         GSM8K / MATH-style data from `datasets`, scored with math-verify
"""

from __future__ import annotations

import importlib
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from ntp_rl.errors import ConfigError, UserError

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


@dataclass
class WithRewardFunction:
    """A task whose reward comes from the user's own function: `task.reward_fn=package.module:function`,
    called as function(completion, problem) -> float. Everything else is the wrapped task's."""

    task: Task
    reward_fn: Callable[[str, TaskProblem], float]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def load_reward_fn(spec: str) -> Callable[[str, TaskProblem], float]:
    """Import `package.module:function`; the string is a name to import, never code to evaluate."""
    module_name, colon, attr = spec.partition(":")
    if not colon or not module_name or not attr.isidentifier():
        raise ConfigError("task.reward_fn", "must name a function as package.module:function", spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("task.reward_fn", f"cannot import {module_name} ({exc})", spec) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError("task.reward_fn", f"{module_name} has no function {attr}", spec)
    _check_reward_signature(fn, spec)
    return fn


def _check_reward_signature(fn: Callable, spec: str) -> None:
    """The function must take (completion, problem): checked on its signature, without calling
    it, so that a function that would do something else with one argument is never run."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        raise ConfigError("task.reward_fn", "its signature cannot be read; give a Python function "
                          "f(completion, problem) -> float", spec) from None
    try:
        signature.bind("completion", "problem")
    except TypeError:
        raise ConfigError("task.reward_fn", f"must accept (completion, problem); {attr_name(spec)} takes "
                          f"{signature}", spec) from None


def attr_name(spec: str) -> str:
    module_name, _, attr = spec.partition(":")
    return f"{module_name}.{attr}"


def reward(task: Task, completion: str, problem: TaskProblem, format_weight: float = 0.0) -> float:
    """1.0 for a right answer, 0.0 otherwise, plus `format_weight` when any answer could be extracted
    (or the user's reward function's value, when the task has one)."""
    return score(task, completion, problem, format_weight)[0]


def score(task: Task, completion: str, problem: TaskProblem, format_weight: float = 0.0) -> tuple[float, bool]:
    """(reward, whether the answer is right), reading and checking the answer once (math-verify is not free)."""
    if isinstance(task, WithRewardFunction):
        value = task.reward_fn(completion, problem)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise UserError(f"task.reward_fn: returned {type(value).__name__} {str(value)[:40]!r}, not a number")
        return float(value), is_correct(task, completion, problem)
    answer = task.extract_answer(completion)
    correct = answer is not None and task.answer_matches(answer, problem)
    return float(correct) + (format_weight if answer is not None else 0.0), correct


# kind -> factory(task_cfg) -> Task
KINDS: dict[str, Callable[[Any], Task]] = {}

# kind -> the module that registers it. build_task imports only the one asked for, so a
# task's heavy dependencies (reasoning_gym, datasets, math_verify) load only when used.
KIND_MODULES = {
    "embedded": "ntp_rl.tasks.embedded",
    "reasoning_gym": "ntp_rl.tasks.reasoning_gym",
    "hf_math": "ntp_rl.tasks.hf_math",
}


def register(kind: str) -> Callable:
    def wrap(factory: Callable[[Any], Task]) -> Callable[[Any], Task]:
        KINDS[kind] = factory
        return factory

    return wrap


def build_task(task_cfg: Any) -> Task:
    kind = task_cfg.kind
    if kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in KINDS:
        known = sorted(set(KINDS) | set(KIND_MODULES))
        raise ConfigError("task.kind", f"unknown task kind; choose one of: {', '.join(known)}", kind)
    task = KINDS[kind](task_cfg)
    spec = getattr(task_cfg, "reward_fn", None)
    return WithRewardFunction(task, load_reward_fn(spec)) if spec else task


def fill_prompt(template: str, question: str) -> str:
    # Not str.format: templates and questions may hold braces of their own (LaTeX, code).
    return template.replace("{question}", question)


def template_stop_strings(template: str) -> tuple[str, ...]:
    """Where a base model starts inventing the next problem: a new line opening like the
    question does ("Problem: {question}..." -> "\nProblem:")."""
    opening = template.split("{question}", 1)[0].rstrip().rsplit("\n", 1)[-1]
    return (f"\n{opening}",) if opening else ()
