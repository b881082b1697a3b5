"""The embedded procedural reasoning task: arithmetic word problems with worked solutions.

One generator serves four consumers: pre-training text, RL prompts, validation and eval problems.
They must never overlap, so every problem belongs to exactly one split, decided by a
hash of its arithmetic alone. The same sums told about another person or as a bare
expression land in the same split, so no surface variation leaks a test problem into
pre-training.

A document looks like this (digits are tokenized one by one, so the format is easy
for a tiny model to pick up)::

    Question: Ann has 12 apples. She buys 7 more. Then she gives away 5. How many apples does Ann have now?
    Answer: 12 + 7 = 19. 19 - 5 = 14. #### 14

With `solution_order="any"` the additions and subtractions between two multiplications are
worked in an order drawn from all that keep every intermediate result in range, so the same
question can also be answered "12 - 5 = 7. 7 + 7 = 14. #### 14". That gives the answers real
next-token uncertainty (a fork at the first equation) for a shaped loss to act on; with the
default "given" every answer is fully determined by its question.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from itertools import islice, permutations
from typing import Iterator

from ntp_rl.config.schema import SolutionOrder

SPLITS = ("pretrain", "rl", "validation", "test")
SOLUTION_ORDERS = tuple(order.value for order in SolutionOrder)  # data.solution_order's values

# Shares of the problem space, in percent, in the order of SPLITS. "validation" (for tuning RL
# without reading the test split) was carved from the rl share, so pretrain and test are as before.
_SPLIT_PERCENT = (80, 8, 2, 10)

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Level:
    """How hard the problems of one difficulty are."""

    steps: tuple[int, ...]  # possible numbers of equations in the solution
    bound: int  # every operand and every intermediate result is < bound
    multiply: bool  # may use "* f" steps (f in 2..9) and "k bags of m each"


# The difficulty table. Results stay below `bound` too, so the number of digits a model
# must carry is fixed per level rather than growing with the chain.
LEVELS: dict[int, Level] = {
    1: Level(steps=(1,), bound=20, multiply=False),
    2: Level(steps=(2,), bound=50, multiply=False),
    3: Level(steps=(3,), bound=100, multiply=True),
    4: Level(steps=(4,), bound=1000, multiply=True),
    5: Level(steps=(5, 6), bound=1000, multiply=True),
}

_MAX_FACTOR = 9
_PLAIN_SHARE = 0.25  # share of problems asked as a bare expression instead of a story
_BAGS_SHARE = 0.25  # with multiplication: share of stories that start with "k bags of m"
_OP_WEIGHTS = {"+": 2, "-": 2, "*": 1}

_PEOPLE = (
    ("Ann", "she"), ("Ben", "he"), ("Carla", "she"), ("Dev", "he"), ("Emma", "she"),
    ("Farid", "he"), ("Gita", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jon", "he"),
    ("Kofi", "he"), ("Lena", "she"), ("Mateo", "he"), ("Nora", "she"), ("Omar", "he"),
    ("Priya", "she"), ("Quinn", "he"), ("Rosa", "she"), ("Sam", "he"), ("Tara", "she"),
)
_OBJECTS = ("apples", "marbles", "stickers", "coins", "books", "pencils", "shells", "cards", "stamps", "cookies")
_VERBS = {
    "+": ("buys {x} more", "finds {x} more", "gets {x} more from a friend", "wins {x} more"),
    "-": ("gives away {x}", "loses {x}", "sells {x}", "trades away {x}"),
    "*": ("ends up with {x} times as many",),
}

Step = tuple[str, int]  # (operator, operand), applied to the running total


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the worked equations, ending with "#### <answer>"
    answer: str  # canonical final answer, e.g. "14"
    # The arithmetic as the question tells it, e.g. "12+7-5": what the split is decided on, so
    # a solution worked in another order never moves a problem to another split.
    canonical: str

    @property
    def prompt(self) -> str:
        """What the model is conditioned on in RL and eval."""
        return f"Question: {self.question}\nAnswer:"

    @property
    def completion(self) -> str:
        """The reference continuation of `prompt`."""
        return f" {self.solution}"

    @property
    def document(self) -> str:
        """The pre-training text of this problem; the packer adds EOS between documents."""
        return self.prompt + self.completion


# ---------------------------------------------------------------------------
# Generation


def generate_problem(rng: random.Random, difficulty: int, order_rng: random.Random | None = None) -> Problem:
    """Draw one problem of the given difficulty; all randomness comes from `rng`.

    With `order_rng` the solution is worked in an order drawn from it (see the module's
    docstring). It is a separate generator so that the questions drawn from `rng` are the same
    whichever order the solutions take.
    """
    level = _level(difficulty)
    num_steps = rng.choice(level.steps)
    plain = rng.random() < _PLAIN_SHARE
    # The bags opening is itself the first equation (k * m), so it costs one step.
    bags = level.multiply and not plain and rng.random() < _BAGS_SHARE
    if bags:
        k = rng.randint(2, _MAX_FACTOR)
        m = rng.randint(2, (level.bound - 1) // k)
        start, steps = k, [("*", m)] + _draw_steps(rng, level, k * m, num_steps - 1)
    else:
        start = rng.randint(2, level.bound - 1)
        steps = _draw_steps(rng, level, start, num_steps)
    worked = steps if order_rng is None else _any_valid_order(order_rng, level, start, steps)
    solution, answer = _solve(start, worked)
    if plain:
        question = f"What is {render_expression(start, steps)}?"
    else:
        question = _story(rng, start, steps, bags)
    canonical = str(start) + "".join(f"{op}{x}" for op, x in steps)
    return Problem(question=question, solution=solution, answer=str(answer), canonical=canonical)


def _level(difficulty: int) -> Level:
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be in {min(LEVELS)}..{max(LEVELS)}, got {difficulty!r}")
    return LEVELS[difficulty]


def _draw_steps(rng: random.Random, level: Level, value: int, count: int) -> list[Step]:
    """Draw operations that keep every intermediate result in [0, bound).

    Operands are drawn from the range that keeps the result valid instead of
    re-drawing whole problems, so long chains cost no more than short ones.
    """
    steps: list[Step] = []
    for _ in range(count):
        ops = _feasible_ops(level, value)
        op = rng.choices(ops, weights=[_OP_WEIGHTS[o] for o in ops])[0]
        if op == "+":
            x = rng.randint(1, level.bound - 1 - value)
        elif op == "-":
            x = rng.randint(1, value)
        else:
            x = rng.randint(2, min(_MAX_FACTOR, (level.bound - 1) // value))
        steps.append((op, x))
        value = _apply(value, op, x)
    return steps


def _feasible_ops(level: Level, value: int) -> list[str]:
    ops = []
    if value < level.bound - 1:
        ops.append("+")
    if value > 0:
        ops.append("-")
    if level.multiply and 0 < value and 2 * value < level.bound:
        ops.append("*")
    return ops


def _apply(value: int, op: str, x: int) -> int:
    if op == "+":
        return value + x
    if op == "-":
        return value - x
    if op == "*":
        return value * x
    raise ValueError(f"unknown operator {op!r}")


def _any_valid_order(rng: random.Random, level: Level, start: int, steps: list[Step]) -> list[Step]:
    """The steps with each run of additions and subtractions reordered, uniformly among the
    orders whose intermediate results all stay in [0, bound); a multiplication stays in place,
    since it does not commute with the sums around it."""
    worked: list[Step] = []
    value, i = start, 0
    while i < len(steps):
        if steps[i][0] == "*":
            worked.append(steps[i])
            value = _apply(value, *steps[i])
            i += 1
            continue
        end = i
        while end < len(steps) and steps[end][0] != "*":
            end += 1
        run = steps[i:end]
        # set(): repeated steps (+3, +3) would count one order twice and weight the draw
        orders = sorted({order for order in permutations(run) if _in_range(level, value, order)})
        chosen = list(rng.choice(orders))  # never empty: the given order is in range
        worked += chosen
        for op, x in chosen:
            value = _apply(value, op, x)
        i = end
    return worked


def _in_range(level: Level, value: int, steps: tuple[Step, ...]) -> bool:
    for op, x in steps:
        value = _apply(value, op, x)
        if not 0 <= value < level.bound:
            return False
    return True


def _solve(start: int, steps: list[Step]) -> tuple[str, int]:
    equations = []
    value = start
    for op, x in steps:
        result = _apply(value, op, x)
        equations.append(f"{value} {op} {x} = {result}.")
        value = result
    return " ".join(equations + [f"{ANSWER_MARK} {value}"]), value


def render_expression(start: int, steps: list[Step]) -> str:
    """Write the left-to-right chain as an expression ordinary precedence reads the same way."""
    text, has_sum = str(start), False
    for op, x in steps:
        if op == "*" and has_sum:
            text = f"({text})"
            has_sum = False
        text = f"{text} {op} {x}"
        has_sum = has_sum or op in "+-"
    return text


def _story(rng: random.Random, start: int, steps: list[Step], bags: bool) -> str:
    name, pronoun = rng.choice(_PEOPLE)
    thing = rng.choice(_OBJECTS)
    if bags:
        (_, m), steps = steps[0], steps[1:]
        sentences = [f"{name} has {start} bags of {m} {thing} each."]
    else:
        sentences = [f"{name} has {start} {thing}."]
    for i, (op, x) in enumerate(steps):
        verb = rng.choice(_VERBS[op]).format(x=x)
        sentences.append(f"{pronoun.capitalize()} {verb}." if i == 0 else f"Then {pronoun} {verb}.")
    sentences.append(f"How many {thing} does {name} have now?")
    return " ".join(sentences)


# ---------------------------------------------------------------------------
# Splits

def split_of(problem: Problem) -> str:
    """pretrain / rl / validation / test, from a stable hash of the problem's arithmetic."""
    digest = hashlib.sha256(problem.canonical.encode()).digest()
    bucket = int.from_bytes(digest[:8], "big") % 100
    for split, percent in zip(SPLITS, _SPLIT_PERCENT):
        if bucket < percent:
            return split
        bucket -= percent
    raise AssertionError("split percentages must sum to 100")


def _stream_seed(seed: int, split: str, difficulty: int, purpose: str = "") -> int:
    # hashlib, not hash(): Python salts str hashes per process.
    digest = hashlib.sha256(f"ntp-rl corpus/{seed}/{split}/{difficulty}{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def iter_problems(split: str, seed: int, difficulty: int, solution_order: str = "given") -> Iterator[Problem]:
    """An endless, deterministic stream of the problems of one split.

    Each split draws from its own RNG, so asking for more RL problems never changes
    which problems pre-training or eval see; the solution orders draw from another, so the
    questions are the same for every `solution_order`.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if solution_order not in SOLUTION_ORDERS:
        raise ValueError(f"unknown solution order {solution_order!r}; expected one of {', '.join(SOLUTION_ORDERS)}")
    _level(difficulty)
    rng = random.Random(_stream_seed(seed, split, difficulty))
    order_rng = random.Random(_stream_seed(seed, split, difficulty, "/order")) if solution_order == "any" else None
    while True:
        problem = generate_problem(rng, difficulty, order_rng)
        if split_of(problem) == split:
            yield problem


def sample_problems(split: str, seed: int, difficulty: int, n: int, solution_order: str = "given") -> list[Problem]:
    return list(islice(iter_problems(split, seed, difficulty, solution_order), n))


def sample_documents(split: str, seed: int, difficulty: int, n: int, solution_order: str = "given") -> list[str]:
    return [p.document for p in sample_problems(split, seed, difficulty, n, solution_order)]


# ---------------------------------------------------------------------------
# Checking answers

_ANSWER = re.compile(r"\s*(-?\d[\d,]*)(?![\d,]|\.\d)")


def extract_answer(text: str) -> str | None:
    """The integer right after the first "####", normalised ("1,000" -> "1000"), else None."""
    _, mark, after = text.partition(ANSWER_MARK)
    if not mark:
        return None
    match = _ANSWER.match(after)
    if match is None:
        return None
    return _normalise(match.group(1))


def _normalise(number: str) -> str | None:
    digits = number.replace(",", "").strip()
    try:
        return str(int(digits))
    except ValueError:
        return None


def is_correct(completion: str, problem_answer: str) -> bool:
    predicted = extract_answer(completion)
    return predicted is not None and predicted == _normalise(problem_answer)
