"""Scoring sampled completions of a task: Avg@n, Cons@n, pass@k, lengths.

`rl` uses it for its periodic held-out checks and `eval` for its reports, so both stages
report the same numbers under the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ntp_rl.generation import Completion, Generator, Sampling
from ntp_rl.metrics import majority_vote, pass_at_k
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
    n = len(completions)
    if scored is None:
        scored = score_all(task, [(c.text, problem) for c in completions])
    answers, flags = [s.answer for s in scored], [s.correct for s in scored]
    vote = majority_vote(answers)
    lengths = [len(c.token_ids) for c in completions]
    return ProblemResult(
        id=problem.id,
        answer=problem.answer,
        n=n,
        correct=sum(flags),
        majority=vote,
        majority_correct=vote is not None and flags[answers.index(vote)],  # the same answer text: the same verdict
        pass_at_k={k: pass_at_k(n, sum(flags), k) for k in ks if k <= n},
        mean_length=sum(lengths) / max(n, 1),
        truncated=sum(c.truncated for c in completions),
        min_length=min(lengths, default=0),
        max_length=max(lengths, default=0),
        samples=[c.text for c in completions] if keep_samples else [],
        timed_out=sum(s.timed_out for s in scored),
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


def sample_and_score(generator: Generator, task: Task, problems: Sequence[TaskProblem], n: int, sampling: Sampling,
                     ks: Sequence[int], seed: int, keep_samples: bool = False) -> list[ProblemResult]:
    completions = generator.generate([p.prompt for p in problems], n, sampling, seed)
    # Every sample of the call in one batch: the scoring workers share them all out.
    scored = score_all(task, [(c.text, p) for p, cs in zip(problems, completions) for c in cs])
    starts = [0]
    for cs in completions:
        starts.append(starts[-1] + len(cs))
    return [score_problem(task, p, cs, ks, keep_samples, scored[start:end])
            for p, cs, start, end in zip(problems, completions, starts, starts[1:])]


def deal_chunks(num_problems: int, per_call: int, rank: int, world: int) -> list[range]:
    """This process's chunks of the problems: chunk c (`per_call` problems, one generate call) goes to process c mod world."""
    chunks = [range(s, min(s + per_call, num_problems)) for s in range(0, num_problems, per_call)]
    return chunks[rank::world]


def sample_and_score_chunks(generator: Generator, task: Task, problems: Sequence[TaskProblem], n: int, sampling: Sampling,
                            ks: Sequence[int], chunk_seed: Callable[[int], int], rank: int, world: int, per_call: int,
                            keep_samples: bool = False, on_chunk: Optional[Callable[[int], object]] = None
                            ) -> list[ProblemResult]:
    """This process's chunks, each sampled with a seed of its own (`chunk_seed(c)`), then every
    process's results in problem order.

    The samples depend on (seed, chunk), never on which process drew the chunk, so the results
    are the same for any number of processes.
    """
    from accelerate.utils import gather_object

    scored: list[tuple[int, ProblemResult]] = []
    for chunk in deal_chunks(len(problems), per_call, rank, world):
        out = sample_and_score(generator, task, [problems[i] for i in chunk], n, sampling, ks,
                               seed=chunk_seed(chunk.start // per_call), keep_samples=keep_samples)
        scored += zip(chunk, out)
        if on_chunk is not None:
            on_chunk(len(chunk))
    gathered = gather_object(scored) if world > 1 else scored
    return [result for _, result in sorted(gathered, key=lambda pair: pair[0])]
