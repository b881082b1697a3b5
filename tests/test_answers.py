r"""The answer-checking layer (ntp_rl/tasks/hf_math.py + ntp_rl/tasks scoring) against the answer styles of
the benchmarks the paper reports: every verdict asserted, right answers accepted and wrong ones refused.

Each row is (benchmark, the dataset's answer field as the dataset holds it, its answer_format, a completion,
the verdict a reader would give). The golds are written as the hub datasets write them (AIME's "033",
AMC23's float 27.0, MATH-500's LaTeX, Minerva's 5.8e-3, OlympiadBench's list of "$...$" strings, GSM8K's
"#### 1,234"); the completions as models write them (boxed, labelled choices, Minerva's final line, units).
"""

import time
from types import SimpleNamespace

import pytest

from ntp_rl.config.schema import AnswerFormat
from ntp_rl.tasks import ScoringSettings, TaskProblem, WithRewardFunction, score_all
from ntp_rl.tasks.hf_math import HFMathTask, extract_completion_answer, gold_answer

P, B, G = AnswerFormat.plain, AnswerFormat.boxed, AnswerFormat.gsm8k

CASES = [
    # AIME 2024 / 2025: an integer 0-999, written with leading zeros in some sources
    ("aime", "204", P, r"Adding up, the answer is $\boxed{204}$.", True),
    ("aime", "204", P, r"Adding up, the answer is $\boxed{240}$.", False),
    ("aime", "033", P, r"So $m+n = \boxed{33}$.", True),
    ("aime", "33", P, r"\boxed{033}", True),
    ("aime", 80, P, r"Therefore the number of ways is \boxed{80}.", True),
    ("aime", "80", P, r"\boxed{80.5}", False),
    ("aime", "204", P, r"At first I get \boxed{17}. That double counts; correcting it, \boxed{204}", True),
    ("aime", "17", P, r"At first I get \boxed{17}. That double counts; correcting it, \boxed{204}", False),
    ("aime", "204", P, "Summing the three cases gives 60 + 64 + 80 = 204", True),
    ("aime", "204", P, "We first count the cases where the first digit is 2 and then the cases where", False),
    # AMC 2023 (math-ai/amc23): choices rendered as values, stored as floats
    ("amc23", 27.0, P, r"The answer is $\boxed{\textbf{(C)}\ 27}$", True),
    ("amc23", 27.0, P, r"The answer is $\boxed{\textbf{(D)}\ 28}$", False),
    ("amc23", 27.0, P, r"\boxed{27}", True),
    ("amc23", 0.75, P, r"so the probability is $\boxed{\frac{3}{4}}$", True),
    ("amc23", 0.75, P, r"so the probability is $\boxed{\frac{2}{3}}$", False),
    # multiple choice with a letter for gold (MATH's "\text{(C)}", AMC sources keeping the letter)
    ("choice", "C", P, r"\boxed{C}", True),
    ("choice", "C", P, r"\boxed{\text{(B)}}", False),
    ("choice", r"\text{(C)}", P, r"Hence $\boxed{\textbf{(C)}\ 27}$", True),
    ("choice", r"\text{(C)}", P, r"Hence $\boxed{\textbf{(E)}\ 31}$", False),
    ("choice", "(E)", P, r"The answer is $\boxed{(E)}$.", True),
    # MATH-500: LaTeX answers of every kind
    ("math500", r"\frac{14}{3}", P, r"$\boxed{\dfrac{14}{3}}$", True),
    ("math500", r"\frac{14}{3}", P, r"$\boxed{4.67}$", False),
    ("math500", r"\left( 3, \frac{\pi}{2} \right)", P, r"$\boxed{\left(3,\frac{\pi}{2}\right)}$", True),
    ("math500", r"\left( 3, \frac{\pi}{2} \right)", P, r"$\boxed{\left(\frac{\pi}{2}, 3\right)}$", False),
    ("math500", "p - q", P, r"\boxed{-q + p}", True),
    ("math500", "p - q", P, r"\boxed{q - p}", False),
    ("math500", r"\text{Evelyn}", P, r"The fastest runner is $\boxed{\text{Evelyn}}$.", True),
    ("math500", r"\text{Evelyn}", P, r"The fastest runner is $\boxed{\text{Bob}}$.", False),
    ("math500", "[-2,7]", P, r"\boxed{[-2, 7]}", True),
    ("math500", "[-2,7]", P, r"\boxed{(-2, 7)}", False),
    ("math500", "6 - 5i", P, r"\boxed{6-5i}", True),
    ("math500", "6 - 5i", P, r"\boxed{6+5i}", False),
    ("math500", r"90^\circ", P, r"\boxed{90}", True),
    ("math500", r"10\%", P, r"\boxed{10\%}", True),
    ("math500", r"11\sqrt2", P, r"\boxed{11\sqrt{2}}", True),
    ("math500", r"11\sqrt2", P, r"\boxed{11}", False),
    ("math500", "-2, 1", P, r"The roots are $\boxed{1, -2}$.", True),
    ("math500", "-2, 1", P, r"The roots are $\boxed{1}$.", False),
    ("math500", None, B, r"so $x = \boxed{5}$", True),  # gold from a MATH solution: its \boxed{5}
    # Minerva (math-ai/minervamath): scientific notation, units, symbols
    ("minerva", "5.8e-3", P, r"The concentration is $\boxed{5.8 \times 10^{-3}}$ M.", True),
    ("minerva", "5.8e-3", P, r"The concentration is $\boxed{5.8 \times 10^{-2}}$ M.", False),
    ("minerva", "7.5e-5", P, "Final Answer: The final answer is 7.5e-5. I hope it is correct.", True),
    ("minerva", "7.5e-5", P, "Final Answer: The final answer is 7.5e-4. I hope it is correct.", False),
    ("minerva", "2.75e11", P, r"\boxed{2.75 \times 10^{11}}", True),
    ("minerva", "0.003", P, r"\boxed{3 \times 10^{-3}}", True),
    ("minerva", "4.5", P, r"The radius is $\boxed{4.5 \text{ cm}}$.", True),
    ("minerva", "4.5", P, r"The radius is $\boxed{5.4 \text{ cm}}$.", False),
    ("minerva", r"\frac{2 \pi c}{\lambda}", P, r"\boxed{2\pi c/\lambda}", True),
    ("minerva", r"\frac{2 \pi c}{\lambda}", P, r"\boxed{\pi c/\lambda}", False),
    # OlympiadBench (Hothan/OlympiadBench): final_answer is a list of "$...$" strings
    ("olympiadbench", ["$(0,1]$"], P, r"So the set of values is $\boxed{(0,1]}$.", True),
    ("olympiadbench", ["$(0,1]$"], P, r"So the set of values is $\boxed{(0,1)}$.", False),
    ("olympiadbench", [r"$\frac{1}{2}$"], P, r"So the final answer is $\boxed{\frac{1}{2}}$.", True),
    ("olympiadbench", ["$2$", "$3$"], P, r"So the final answer is $\boxed{2, 3}$.", True),
    ("olympiadbench", ["$2$", "$3$"], P, r"So the final answer is $\boxed{2}$.", False),
    ("olympiadbench", ["$2$", "$3$"], P, r"So $n = \boxed{2}$ or $n = \boxed{3}$.", True),
    ("olympiadbench", ["$x=2$"], P, r"So the final answer is $\boxed{2}$.", True),
    ("olympiadbench", [r"$\sqrt{3}-1$"], P, r"$\boxed{-1+\sqrt{3}}$", True),
    ("olympiadbench", [r"$\sqrt{3}-1$"], P, r"$\boxed{1-\sqrt{3}}$", False),
    # GSM8K: the solution ends "#### 1,234"; models write "####" or a box
    ("gsm8k", "1000 + 234 = 1234\n#### 1,234", G, " 1000 + 234 = 1234 #### 1,234", True),
    ("gsm8k", "1000 + 234 = 1234\n#### 1,234", G, r" so the answer is $\boxed{1234}$", True),
    ("gsm8k", "1000 + 234 = 1234\n#### 1,234", G, " #### 7 then Question: what is 1 + 1? Answer: 1234", False),
]


def _task(**scoring) -> HFMathTask:
    task = HFMathTask(name="table", path="unused", subset=None, splits={}, question_field="q", answer_field="a",
                      answer_format=AnswerFormat.plain)
    task.scoring = ScoringSettings(**scoring)
    return task


def _problem(i, field, answer_format, completion) -> TaskProblem:
    if field is None:  # a MATH solution: the gold is its boxed answer
        field = r"Solving, $x = \boxed{5}$."
    gold = gold_answer(field, answer_format)
    assert gold is not None, field
    return TaskProblem(id=str(i), prompt="", answer=gold)


def test_the_table_covers_every_benchmark_both_ways():
    assert len(CASES) >= 40
    for bench in ("aime", "amc23", "choice", "math500", "minerva", "olympiadbench", "gsm8k"):
        verdicts = {expected for b, *_, expected in CASES if b == bench}
        assert verdicts == {True, False}, f"{bench} needs right and wrong answers"


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "two-workers"])
def test_every_verdict_in_the_table(workers):
    items = [(completion, _problem(i, field, fmt, completion)) for i, (_, field, fmt, completion, _) in enumerate(CASES)]
    scored = score_all(_task(workers=workers), items)
    wrong = [(bench, field, completion, s) for (bench, field, _, completion, expected), s in zip(CASES, scored)
             if s.correct is not expected or s.timed_out]
    assert not wrong, "\n".join(map(str, wrong))
    for (_, _, _, _, expected), s in zip(CASES, scored):
        assert s.reward == float(expected)


def test_the_issue_examples_read_as_written():
    # OlympiadBench's list was passed as str(list); Minerva's 5.8e-3 read as 5.8 * e - 3.
    assert gold_answer(["$(0,1]$"], AnswerFormat.plain) == "(0,1]"
    assert gold_answer(["$2$", "$3$"], AnswerFormat.plain) == "2, 3"
    assert extract_completion_answer(r"so it is \boxed{(0,1]}") == "(0,1]"
    assert extract_completion_answer("Final Answer: The final answer is 5.8e-3. I hope it is correct.") == \
        r"5.8\times 10^{-3}"
    assert extract_completion_answer("I cannot tell.") is None


def test_a_check_past_the_time_limit_scores_zero_and_is_counted(tmp_path, monkeypatch):
    """In a worker: a Python loop is stopped by the worker's own alarm; 10^{10^{10}} hangs sympy in C, where
    no signal reaches, and is caught by the parent, which ends the pool and scores everything else."""
    (tmp_path / "slow_rewards.py").write_text(
        "def loops_on_loop(completion, problem):\n"
        "    while completion == 'loop':\n        pass\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from slow_rewards import loops_on_loop

    five = TaskProblem(id="0", prompt="", answer="5")
    items = [(r"\boxed{5}", five), ("loop", five), (r"\boxed{10^{10^{10}}}", five), (r"\boxed{6}", five),
             (r"\boxed{5}", five)]
    task = WithRewardFunction(_task(), loops_on_loop)
    task.scoring = ScoringSettings(workers=1, time_limit_s=0.5)
    started = time.perf_counter()
    scored = score_all(task, items)
    assert time.perf_counter() - started < 30
    assert [s.timed_out for s in scored] == [False, True, True, False, False]
    assert [s.correct for s in scored] == [True, False, False, False, True]
    assert [s.reward for s in scored] == [0.5, 0.0, 0.0, 0.5, 0.5]
    # The pool that was ended is replaced: the next call is scored as usual.
    assert [s.correct for s in score_all(task, [(r"\boxed{5}", five)])] == [True]
    # In this process the alarm stops the Python loop as well.
    task.scoring = ScoringSettings(workers=0, time_limit_s=0.2)
    assert [s.timed_out for s in score_all(task, items[:2])] == [False, True]


def test_timeouts_are_counted_in_the_eval_summary():
    from ntp_rl.evaluation import score_problem, summarize
    from ntp_rl.generation import Completion

    five = TaskProblem(id="0", prompt="", answer="5")
    completions = [Completion(0, text, [1, 2], False) for text in (r"\boxed{5}", r"\boxed{10^{10^{10}}}", r"\boxed{5}")]
    task = _task(workers=1, time_limit_s=0.5)
    result = score_problem(task, five, completions, [1, 2])
    assert (result.correct, result.timed_out, result.majority, result.majority_correct) == (2, 1, "5", True)
    assert summarize([result], [1])["scoring_timeouts"] == 1


def test_scoring_settings_come_from_the_task_config():
    from ntp_rl.config.compose import compose
    from ntp_rl.config.validate import validate_eval
    from ntp_rl.errors import ConfigError

    cfg = SimpleNamespace(kind="embedded", difficulty=2, seed=0, score_workers=3, score_time_limit_s=2.5)
    from ntp_rl.tasks import build_task

    assert build_task(cfg).scoring == ScoringSettings(workers=3, time_limit_s=2.5)
    for key, value, message in (("task.score_workers", -1, "must be >= 0"), ("task.score_time_limit_s", 0, "must be > 0")):
        cfg = compose("eval", ["model=hf", "model.name_or_path=Qwen/Qwen3-0.6B", f"{key}={value}"])
        with pytest.raises(ConfigError, match=f"^{key}={value}(.0)?: {message}"):
            validate_eval(cfg)

