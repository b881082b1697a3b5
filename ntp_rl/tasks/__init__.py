"""Verifiable tasks behind one registry: what `rl` trains on and `eval` measures.

A task is a small object: problems (a prompt and a ground-truth answer), a way to pull the
final answer out of a completion, and a reward (1.0 right / 0.0 wrong, plus an optional
format bonus). Tasks are registered by `kind`; a config (conf/task/*.yaml) picks one:

    embedded        the procedural corpus's held-out splits (ntp_rl/data/corpus.py)
    reasoning_gym   procedural datasets generated and scored offline by reasoning-gym
    hf_math         GSM8K / MATH-style data from `datasets`, scored with math-verify

Scoring is one layer for every stage (`score`, `score_all`): each completion is checked under a
time limit (`task.score_time_limit_s`); one that runs past it scores 0 and is counted. Tasks whose
checks are costly (math-verify: 0.01-0.5 s a completion, and some answers such as 10^{10^{10}} hang
it in C code, where no signal reaches) are checked in worker processes (`task.score_workers`).
The workers start by multiprocessing's forkserver, which imports the parent's main script: a
script that scores this way needs the `if __name__ == "__main__":` guard (the CLI has it).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

from ntp_rl.errors import ConfigError, UserError

# Splits every task serves: RL trains on "train", eval measures on "test". For the embedded
# task both are disjoint from the pre-training text.
TASK_SPLITS = ("train", "test")
# Tasks that also serve a "validation" split, disjoint from both by construction, to tune on
# without reading the test split (rl.eval_split=validation).
_MORE_SPLITS = {"embedded": ("train", "validation", "test")}


def task_splits(kind: str) -> tuple[str, ...]:
    return _MORE_SPLITS.get(kind, TASK_SPLITS)


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
    return score(task, completion, problem)[1]


@dataclass
class WithRewardFunction:
    """A task whose reward comes from the user's own function: `task.reward_fn=package.module:function`,
    called as function(completion, problem) -> float. Everything else is the wrapped task's."""

    task: Task
    reward_fn: Callable[[str, TaskProblem], float]

    def __getattr__(self, name: str) -> Any:
        if name == "task":  # not set yet (unpickling in a scoring worker): no endless lookup
            raise AttributeError(name)
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
    scored = score_all(task, [(completion, problem)], format_weight)[0]
    return scored.reward, scored.correct


@dataclass(frozen=True)
class Scored:
    reward: float
    correct: bool
    answer: Optional[str]  # the answer read from the completion; None when none could be read
    timed_out: bool = False  # its check ran past task.score_time_limit_s: reward 0, wrong


@dataclass(frozen=True)
class ScoringSettings:
    workers: Optional[int] = None  # processes that check answers; 0: this process; null: the cores, at most 8
    time_limit_s: float = 5.0  # per completion

    def worker_count(self) -> int:
        if self.workers is not None:
            return self.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        # Every process of an `accelerate launch` run has its own workers: share the cores out.
        return max(1, min(8, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def score_all(task: Task, items: Sequence[tuple[str, TaskProblem]], format_weight: float = 0.0) -> list[Scored]:
    """Each (completion, problem) scored, in order, each under the task's time limit; in worker
    processes when the task's checks are costly (`scores_in_workers`) and workers are allowed."""
    settings = getattr(task, "scoring", None) or ScoringSettings()
    workers = settings.worker_count()
    if not getattr(task, "scores_in_workers", False) or workers == 0 or not items:
        return [_score_one(task, completion, problem, format_weight, settings.time_limit_s)
                for completion, problem in items]
    return _score_in_workers(task, list(items), format_weight, settings.time_limit_s, workers)


class ScoringTimeout(BaseException):
    """A check ran past its time limit. Not an Exception, so that a checker's own `except Exception`
    (math-verify has many) cannot swallow it."""


@contextmanager
def time_limit(seconds: float):
    """Raise ScoringTimeout in the block after `seconds` (SIGALRM: the main thread only; elsewhere no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise ScoringTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _score_one(task: Task, completion: str, problem: TaskProblem, format_weight: float, limit: float) -> Scored:
    try:
        with time_limit(limit):
            answer = task.extract_answer(completion)
            correct = answer is not None and task.answer_matches(answer, problem)
            if isinstance(task, WithRewardFunction):
                value = task.reward_fn(completion, problem)
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise UserError(f"task.reward_fn: returned {type(value).__name__} {str(value)[:40]!r}, not a number")
                return Scored(float(value), correct, answer)
            return Scored(float(correct) + (format_weight if answer is not None else 0.0), correct, answer)
    except ScoringTimeout:
        return Scored(0.0, False, None, timed_out=True)


def _score_chunk(task: Task, items: list[tuple[str, TaskProblem]], format_weight: float, limit: float) -> list[Scored]:
    return [_score_one(task, completion, problem, format_weight, limit) for completion, problem in items]


_POOLS: dict[int, Any] = {}  # worker count -> a multiprocessing pool, kept for the process's later calls


def _pool(workers: int, task: Task) -> Any:
    if workers not in _POOLS:
        import multiprocessing

        # forkserver: a fork of this process would copy its threads (torch, vLLM) and their locks.
        pool = multiprocessing.get_context("forkserver").Pool(workers, initializer=_start_worker)
        # Wait, without a limit, until a worker has started and imported what a check needs: the limits below
        # time the checks, and a worker's start (seconds on a busy machine) counted against them would score
        # every completion of the first chunks as timed out.
        pool.map(_started, [task] * workers, chunksize=1)  # unpickling the task imports its module
        _POOLS[workers] = pool
    return _POOLS[workers]


def _end_pool(workers: int) -> None:
    pool = _POOLS.pop(workers, None)
    if pool is not None:
        pool.terminate()


def _start_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which ends the pool
    import math_verify

    math_verify.verify(math_verify.parse("$1$"), math_verify.parse("$1$"))  # its first check builds its parsers


def _started(_: Any) -> bool:
    return True


def _score_in_workers(task: Task, items: list[tuple[str, TaskProblem]], format_weight: float, limit: float,
                      workers: int) -> list[Scored]:
    """Chunks of completions checked by a pool. Each worker stops a check at `limit` itself; one stuck where
    its alarm cannot reach (C code) is caught here: the pool is ended and the chunk checked again one
    completion at a time, so that only the completion that hangs is scored as timed out."""
    from multiprocessing import TimeoutError as PoolTimeout

    results: list[Optional[Scored]] = [None] * len(items)
    size = max(1, math.ceil(len(items) / (4 * workers)))
    chunks = [list(range(start, min(start + size, len(items)))) for start in range(0, len(items), size)]
    while chunks:
        pool = _pool(workers, task)
        pending = [(chunk, pool.apply_async(_score_chunk, (task, [items[i] for i in chunk], format_weight, limit)))
                   for chunk in chunks]
        chunks = []
        for position, (chunk, result) in enumerate(pending):
            try:
                scored = result.get(timeout=limit * (len(chunk) + 1) + 1.0)
            except PoolTimeout:
                later = pending[position + 1:]
                done = [(c, r.get()) for c, r in later if r.ready()]
                _end_pool(workers)
                for c, out in done:
                    results[c[0]:c[-1] + 1] = out
                if len(chunk) == 1:
                    results[chunk[0]] = Scored(0.0, False, None, timed_out=True)
                else:
                    chunks += [[i] for i in chunk]
                chunks += [c for c, r in later if not r.ready()]
                break
            results[chunk[0]:chunk[-1] + 1] = scored
    return results  # type: ignore[return-value]


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
    if spec:
        task = WithRewardFunction(task, load_reward_fn(spec))
    task.scoring = ScoringSettings(workers=getattr(task_cfg, "score_workers", None),
                                   time_limit_s=float(getattr(task_cfg, "score_time_limit_s", 5.0)))
    return task


def fill_prompt(template: str, question: str) -> str:
    # Not str.format: templates and questions may hold braces of their own (LaTeX, code).
    return template.replace("{question}", question)


def template_stop_strings(template: str) -> tuple[str, ...]:
    """Where a base model starts inventing the next problem: a new line opening like the
    question does ("Problem: {question}..." -> "\nProblem:")."""
    opening = template.split("{question}", 1)[0].rstrip().rsplit("\n", 1)[-1]
    return (f"\n{opening}",) if opening else ()
