"""Scoring sampled completions of a task: Avg@n, Cons@n, pass@k, lengths.

`rl` uses it for its periodic held-out checks and `eval` for its reports, so both stages
report the same numbers under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Optional, Sequence

from ntp_rl.generation import Completion, Generator, Sampling
from ntp_rl.metrics import majority_vote, pass_at_k
from ntp_rl.seeding import rl_eval_seed
from ntp_rl.tasks import Scored, Task, TaskProblem, score_all


@dataclass
class ProblemResult:
    id: str
    answer: str
    n: int
    correct: int  # samples whose answer is right
    majority: str | None  # the majority-vote answer
    majority_correct: bool
    pass_at_k: dict[int, float]
    mean_length: float  # response tokens
    truncated: int  # samples cut off at max_new_tokens
    min_length: int = 0
    max_length: int = 0
    timed_out: int = 0  # samples whose check ran past task.score_time_limit_s (scored wrong)
    samples: list[str] = field(default_factory=list)  # the completions' texts (kept when asked)


def score_problem(task: Task, problem: TaskProblem, completions: Sequence[Completion], ks: Sequence[int],
                  keep_samples: bool = False, scored: Optional[Sequence[Scored]] = None) -> ProblemResult:
    """One problem's samples, scored here unless `scored` holds their scores already."""
    if scored is None:
        scored = score_all(task, [(c.text, problem) for c in completions])
    return problem_result(problem, [sample_of(c, s, keep_samples) for c, s in zip(completions, scored)], ks,
                          keep_samples)


@dataclass
class Sample:
    """One scored completion, only what the metrics need of it: small enough to gather between processes."""

    length: int  # response tokens
    truncated: bool
    scored: Scored
    text: str = ""  # kept when samples are


def sample_of(completion: Completion, scored: Scored, keep_text: bool) -> Sample:
    return Sample(len(completion.token_ids), completion.truncated, scored, completion.text if keep_text else "")


def problem_result(problem: TaskProblem, samples: Sequence[Sample], ks: Sequence[int],
                   keep_samples: bool = False) -> ProblemResult:
    n = len(samples)
    answers, flags = [s.scored.answer for s in samples], [s.scored.correct for s in samples]
    vote = majority_vote(answers)
    lengths = [s.length for s in samples]
    return ProblemResult(
        id=problem.id,
        answer=problem.answer,
        n=n,
        correct=sum(flags),
        majority=vote,
        majority_correct=vote is not None and flags[answers.index(vote)],  # the same answer text: the same verdict
        pass_at_k={k: pass_at_k(n, sum(flags), k) for k in ks if k <= n},
        mean_length=sum(lengths) / max(n, 1),
        truncated=sum(s.truncated for s in samples),
        min_length=min(lengths, default=0),
        max_length=max(lengths, default=0),
        samples=[s.text for s in samples] if keep_samples else [],
        timed_out=sum(s.scored.timed_out for s in samples),
    )


def summarize(results: Sequence[ProblemResult], ks: Sequence[int]) -> dict[str, float]:
    """Means over problems: avg@n (mean accuracy), cons@n (majority vote right), pass@k; lengths (tokens) over all samples."""
    count = max(len(results), 1)
    n = results[0].n if results else 0
    summary = {
        "problems": len(results),
        "n": n,
        f"avg@{n}": sum(r.correct / max(r.n, 1) for r in results) / count,
        f"cons@{n}": sum(r.majority_correct for r in results) / count,
        "mean_length": sum(r.mean_length for r in results) / count,
        "min_length": min((r.min_length for r in results), default=0),
        "max_length": max((r.max_length for r in results), default=0),
        "truncated_frac": sum(r.truncated for r in results) / max(sum(r.n for r in results), 1),
        "scoring_timeouts": sum(r.timed_out for r in results),
    }
    for k in ks:
        if k <= n:
            summary[f"pass@{k}"] = sum(r.pass_at_k[k] for r in results) / count
    return summary


# A piece of a generate call: (problem index, index of its first sample, how many samples).
Segment = tuple[int, int, int]


def plan_calls(num_problems: int, n: int, sequences_per_call: int) -> list[list[Segment]]:
    """Every problem's n samples, in problem order, cut into generate calls of `sequences_per_call`
    sequences (the last may hold fewer): a call takes samples of as many problems as fit, and a
    problem whose samples do not fit in what is left of a call goes on in the next one(s)."""
    calls: list[list[Segment]] = []
    call: list[Segment] = []
    room = sequences_per_call
    for problem in range(num_problems):
        first = 0
        while first < n:
            take = min(n - first, room)
            call.append((problem, first, take))
            first, room = first + take, room - take
            if room == 0:
                calls.append(call)
                call, room = [], sequences_per_call
    return calls + [call] if call else calls


def deal_calls(calls: Sequence[list[Segment]], rank: int, world: int) -> list[tuple[int, list[Segment]]]:
    """This process's calls, with their index: call c goes to process c mod world."""
    return list(enumerate(calls))[rank::world]


def sample_call(generator: Generator, task: Task, problems: Sequence[TaskProblem], call: Sequence[Segment],
                sampling: Sampling, seed: int, keep_samples: bool) -> list[tuple[int, int, list[Sample]]]:
    """One generate call's samples, scored: (problem, first sample, its samples) for each segment."""
    counts = [count for _, _, count in call]
    if len(set(counts)) == 1:
        out = generator.generate([problems[p].prompt for p, _, _ in call], counts[0], sampling, seed)
    else:
        # Segments of different sizes (a problem's last samples and the next one's first) in one call:
        # one prompt per sequence, as the generator samples every sequence on its own anyway.
        flat = generator.generate([problems[p].prompt for p, _, count in call for _ in range(count)], 1, sampling, seed)
        out = [[c for cs in flat[end - count:end] for c in cs] for end, count in zip(accumulate(counts), counts)]
    # Every sample of the call in one batch: the scoring workers share them all out.
    scored = iter(score_all(task, [(c.text, problems[p]) for (p, _, _), cs in zip(call, out) for c in cs]))
    return [(p, first, [sample_of(c, next(scored), keep_samples) for c in cs]) for (p, first, _), cs in zip(call, out)]


def sample_and_score_calls(generator: Generator, task: Task, problems: Sequence[TaskProblem], n: int,
                           sampling: Sampling, ks: Sequence[int], call_seed: Callable[[int], int], rank: int,
                           world: int, sequences_per_call: int, keep_samples: bool = False,
                           on_call: Optional[Callable[[int], object]] = None) -> list[ProblemResult]:
    """This process's calls (`plan_calls`), each sampled with a seed of its own (`call_seed(c)`), then
    every process's samples put together, problem by problem, in problem order.

    The samples depend on (seed, call), never on which process drew the call, so the results are
    the same for any number of processes as long as the calls are.
    """
    from accelerate.utils import gather_object

    parts: list[tuple[int, int, list[Sample]]] = []
    for index, call in deal_calls(plan_calls(len(problems), n, sequences_per_call), rank, world):
        parts += sample_call(generator, task, problems, call, sampling, call_seed(index), keep_samples)
        if on_call is not None:
            on_call(sum(count for _, _, count in call))
    gathered = gather_object(parts) if world > 1 else parts
    samples: list[list[Sample]] = [[] for _ in problems]
    for problem, _, part in sorted(gathered, key=lambda part: part[:2]):
        samples[problem] += part
    return [problem_result(problem, s, ks, keep_samples) for problem, s in zip(problems, samples)]


def held_out_check(generator: Generator, task: Task, problems: Sequence[TaskProblem], n: int, sampling: Sampling,
                   ks: Sequence[int], seed: int, rank: int, world: int, batch_size: int) -> dict[str, float]:
    """A training run's check on held-out problems (RL's evaluations, pretrain's train.stop_at), summarized: `n`
    samples of each problem, in calls of as many whole problems as `batch_size` sequences hold, each call seeded
    as it is at every check (`rl_eval_seed`), so checks differ only where the model does."""
    per_call = max(1, batch_size // n)
    results = sample_and_score_chunks(generator, task, problems, n, sampling, ks, lambda chunk: rl_eval_seed(seed, chunk),
                                      rank, world, per_call)
    return summarize(results, ks)


def sample_and_score_chunks(generator: Generator, task: Task, problems: Sequence[TaskProblem], n: int, sampling: Sampling,
                            ks: Sequence[int], chunk_seed: Callable[[int], int], rank: int, world: int, per_call: int,
                            keep_samples: bool = False) -> list[ProblemResult]:
    """`sample_and_score_calls` with calls of `per_call` whole problems (chunk c seeded `chunk_seed(c)`)."""
    return sample_and_score_calls(generator, task, problems, n, sampling, ks, chunk_seed, rank, world, per_call * n,
                                  keep_samples)
