"""Maths benchmarks from `datasets` (hub name or local files), scored with math-verify.

GSM8K, MATH, and the six benchmarks the paper reports (AIME24, AIME25, AMC23, MATH-500,
Minerva, OlympiadBench) are this one task kind with different presets (conf/task/*.yaml).

The reference answer is read from `task.answer_field` in the dataset's own format
(`task.answer_format`): GSM8K's worked solution ending "#### 42", MATH's solution with
\\boxed{...}, or the bare answer; a field holding a list (OlympiadBench's `final_answer`)
is several answers, and all of them must be given.

A completion's answer is, as lighteval and the Qwen and DeepSeek evaluation scripts take it:
the last \\boxed{} (several boxes joined by "and" / "or" are one list of answers), else an
anchored answer ("The final answer is $x$", Minerva's form), else the text after "####"
(GSM8K's), else the last expression in the text. Two answers match when math-verify says
they are mathematically equal, after the conventions the benchmarks write answers in are
made readable to it:

- scientific notation (Minerva's `5.8e-3`) is read as `5.8 \\times 10^{-3}`, not as Euler's e;
- a multiple-choice label before a value (AMC's `\\textbf{(C)}\\ 27`) is dropped, and a gold
  answer that is a letter is compared as a letter;
- lists, tuples, intervals, sets of several answers, units and percentages are math-verify's own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Optional

import math_verify.grader
import math_verify.parser
from math_verify import LatexExtractionConfig, parse, verify

from ntp_rl.config.schema import AnswerFormat
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.tasks import TASK_SPLITS, TaskProblem, fill_prompt, register, template_stop_strings

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
GSM8K_MARK = "####"
# An answer after an anchor ("the final answer is $x$"), nothing else (boxes are read before).
ANCHORED = LatexExtractionConfig(boxed_match_priority=-1, try_extract_without_anchor=False)
BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# What may stand between boxes that give one list of answers: "\boxed{2}$ or $n = \boxed{3}"
BOX_JOINER = re.compile(r"^[\s$]*(?:,|;|and|or|\\text\{\s*(?:and|or)\s*\}|\\quad)?[\s$]*"
                        r"(?:[A-Za-z](?:_\{?\w+\}?)?\s*=)?[\s$]*$")
# Minerva's few-shot answer line, as lm-evaluation-harness reads it
MINERVA_ANSWER = re.compile(r"final answer is(.*?)\.?\s*I hope it is correct", re.IGNORECASE | re.DOTALL)
# 5.8e-3, 2E+5 as numbers (not inside a word or a longer number)
SCIENTIFIC = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?!\w|\.\d)")
_LABEL = r"\\text(?:bf)?\s*\{\s*\(?\s*([A-E])\s*\)?\s*\}|\(\s*([A-E])\s*\)"
CHOICE_ONLY = re.compile(rf"^\s*(?:{_LABEL}|([A-E]))\s*[.:]?\s*$")
LEADING_CHOICE = re.compile(rf"^\s*(?:{_LABEL})(?:\s|\\[ ,;:!]|\\quad|~)*")

# Every check runs under ntp_rl.tasks' own per-completion time limit (score_all). math-verify's
# limits use SIGALRM as well and would cancel it, so they are off, and so is its warning that they are.
math_verify.parser.TIMEOUT_WARNING_SHOWN = True
math_verify.grader.TIMEOUT_WARNING_SHOWN = True


def gold_answer(value: Any, answer_format: AnswerFormat) -> Optional[str]:
    """The final answer inside a dataset's answer field, or None when it has none. A list is
    several answers (OlympiadBench's `final_answer`), joined into one list that must be given whole."""
    if isinstance(value, (list, tuple)):
        parts = [part for part in (gold_answer(v, AnswerFormat.plain) for v in value) if part]
        return ", ".join(parts) or None
    text = str(value)
    if answer_format is AnswerFormat.auto:
        answer_format = (AnswerFormat.gsm8k if GSM8K_MARK in text
                         else AnswerFormat.boxed if "\\boxed" in text else AnswerFormat.plain)
    if answer_format is AnswerFormat.gsm8k:
        _, mark, after = text.rpartition(GSM8K_MARK)
        answer = after.strip().replace(",", "") if mark else ""
    elif answer_format is AnswerFormat.boxed:
        parsed = parse(text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)], parsing_timeout=None)
        answer = parsed[1] if len(parsed) > 1 else ""
    else:
        answer = text.strip()
        if len(answer) > 1 and answer[0] == answer[-1] == "$":  # OlympiadBench writes "$(0,1]$"
            answer = answer.strip("$").strip()
    return answer or None


def extract_completion_answer(completion: str) -> Optional[str]:
    """The answer a completion gives: the last \\boxed{} or an anchored answer ("the final answer is $x$"),
    else Minerva's "The final answer is x. I hope it is correct.", else the word after "####", else the
    last expression; None when there is none."""
    text = readable(completion)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    found = parse(text, extraction_config=[ANCHORED], parsing_timeout=None)
    minerva = None if found else MINERVA_ANSWER.findall(text)
    if minerva:
        return minerva[-1].strip().strip("$").strip() or None
    if not found:
        _, mark, after = text.partition(GSM8K_MARK)
        if mark:  # the GSM8K convention: the answer is what directly follows "####"
            words = after.split(maxsplit=1)
            text = words[0].rstrip(".") if words else ""
        found = parse(text, parsing_timeout=None)
    if not found:
        return None
    return found[1] if len(found) > 1 else str(found[0])


def last_boxed(text: str) -> Optional[str]:
    """The content of the last \\boxed{} (None when there is none); boxes just before it that only
    "and", "or" or a comma separate from it are answers of the same list, joined with commas."""
    boxes, end = [], 0
    for match in BOX.finditer(text):
        if match.start() < end:  # a box inside the box before
            continue
        depth, i = 1, match.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            boxes.append((match.start(), i, text[match.end():i - 1].strip()))
            end = i
    if not boxes:
        return None
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        if not BOX_JOINER.match(text[box[1]:group[0][0]]):
            break
        group.insert(0, box)
    return ", ".join(content for _, _, content in group if content)


def answers_match(gold: str, answer: str) -> bool:
    """Whether an extracted answer is the gold one: a letter against a letter for a multiple-choice gold,
    else mathematical equality (math-verify), with a choice label before a value dropped."""
    letter = choice_letter(gold)
    if letter is not None:
        return choice_letter(answer) == letter or _leading_letter(answer) == letter
    expected, given = _parsed(gold), _parsed(drop_choice_label(answer))
    return bool(expected) and bool(given) and verify(list(expected), list(given), timeout_seconds=None)


def readable(text: str) -> str:
    """Conventions math-verify would misread, rewritten: 5.8e-3 is 5.8 x 10^-3 (it reads 5.8e - 3 with Euler's e)."""
    return SCIENTIFIC.sub(r"\1\\times 10^{\2}", text)


def choice_letter(answer: str) -> Optional[str]:
    """The letter of an answer that is only a multiple-choice label: C, (C), \\text{(C)}, \\textbf{C}."""
    match = CHOICE_ONLY.match(answer)
    return next((g for g in match.groups() if g), None) if match else None


def drop_choice_label(answer: str) -> str:
    """AMC-style answers name the choice and its value ("\\textbf{(C)}\\ 27"): the value is the answer."""
    match = LEADING_CHOICE.match(answer)
    return answer[match.end():] if match and answer[match.end():].strip() else answer


def _leading_letter(answer: str) -> Optional[str]:
    match = LEADING_CHOICE.match(answer)
    return next((g for g in match.groups() if g), None) if match else None


@lru_cache(maxsize=65536)
def _parsed(answer: str) -> tuple:
    # In $...$ so that LaTeX answers ("\frac{1}{2}") parse as LaTeX, not as text.
    text = readable(answer)
    return tuple(parse(f"${text}$", parsing_timeout=None) or parse(text, parsing_timeout=None))


@dataclass
class HFMathTask:
    name: str
    path: str
    subset: Optional[str]
    splits: dict  # task split -> the dataset's split
    question_field: str
    answer_field: str
    answer_format: AnswerFormat
    prompt_template: str = DEFAULT_TEMPLATE
    # math-verify takes 0.01-0.5 s a completion and can hang on one (10^{10^{10}}): scored in worker processes
    scores_in_workers: ClassVar[bool] = True
    # split -> rows read for problems() whose reference answer could not be read (left out; the stages say so)
    unread_answers: dict = field(default_factory=dict)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return template_stop_strings(self.prompt_template)

    def problems(self, split: str, n: int) -> list[TaskProblem]:
        """The first n rows of the split that have a reference answer, in the dataset's order."""
        from ntp_rl.data.hf import load_hf_dataset

        if split not in TASK_SPLITS:
            raise ValueError(f"split must be one of {TASK_SPLITS}, not {split!r}")
        ds = load_hf_dataset(self.path, self.subset, self.splits[split],
                             keys={"path": "task.path", "name": "task.subset", "split": f"task.{split}_split"})
        for key in ("question_field", "answer_field"):
            column = getattr(self, key)
            if column not in ds.column_names:
                raise ConfigError(f"task.{key}", f"no such column in task.path={self.path}; its columns: "
                                  f"{', '.join(ds.column_names)}", column)
        out = []
        for i, row in enumerate(ds):
            if len(out) == n:
                break
            answer = gold_answer(row[self.answer_field], self.answer_format)
            if answer is not None:
                out.append(TaskProblem(id=f"{split}-{i}", prompt=fill_prompt(self.prompt_template, str(row[self.question_field])),
                                       answer=answer))
            else:
                self.unread_answers[split] = self.unread_answers.get(split, 0) + 1
        if not out:
            raise DataError(f"task.path={self.path}: no row of split {self.splits[split]} has a reference answer in "
                            f"task.answer_field={self.answer_field} (task.answer_format={self.answer_format.value})")
        return out

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_completion_answer(completion)

    def answer_matches(self, answer: str, problem: TaskProblem) -> bool:
        return answers_match(problem.answer, answer)


@register("hf_math")
def build(task_cfg: Any) -> HFMathTask:
    path = getattr(task_cfg, "path", None)
    if not path:
        raise ConfigError("task.path", "is required with task.kind=hf_math (a hub dataset name, a local directory or files)")
    local = Path(str(path)).expanduser()
    if not any(ch in str(path) for ch in "*?[") and not local.exists() and (
            local.is_absolute() or str(path).startswith((".", "~")) or local.suffix in (".jsonl", ".json", ".parquet", ".csv")):
        raise DataError(f"task.path={path}: no such file or directory")
    return HFMathTask(
        name=getattr(task_cfg, "name", "hf_math"),
        path=str(path),
        subset=getattr(task_cfg, "subset", None),
        splits={"train": getattr(task_cfg, "train_split", "train"), "test": getattr(task_cfg, "test_split", "test")},
        question_field=getattr(task_cfg, "question_field", "question"),
        answer_field=getattr(task_cfg, "answer_field", "answer"),
        answer_format=getattr(task_cfg, "answer_format", AnswerFormat.auto),
        prompt_template=getattr(task_cfg, "prompt_template", None) or DEFAULT_TEMPLATE,
    )
