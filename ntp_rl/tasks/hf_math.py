"""GSM8K / MATH-style maths from `datasets` (hub name or local files), scored with math-verify.

The reference answer is read from `task.answer_field` in the dataset's own format
(`task.answer_format`): GSM8K's worked solution ending "#### 42", MATH's solution with
\\boxed{...}, or a bare answer. A completion's answer is the word after its "####" when it
writes one, else what math-verify finds (the last \\boxed{}, else the last expression);
two answers match when math-verify says they are mathematically equal, so "\\frac{1}{2}"
and "0.5" are the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from math_verify import LatexExtractionConfig, parse, verify

from ntp_rl.config.schema import AnswerFormat
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.tasks import TASK_SPLITS, TaskProblem, fill_prompt, register, template_stop_strings

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
GSM8K_MARK = "####"


def gold_answer(text: str, answer_format: AnswerFormat) -> Optional[str]:
    """The final answer inside a dataset's answer field, or None when it has none."""
    text = str(text)
    if answer_format is AnswerFormat.auto:
        answer_format = (AnswerFormat.gsm8k if GSM8K_MARK in text
                         else AnswerFormat.boxed if "\\boxed" in text else AnswerFormat.plain)
    if answer_format is AnswerFormat.gsm8k:
        _, mark, after = text.rpartition(GSM8K_MARK)
        answer = after.strip().replace(",", "") if mark else ""
    elif answer_format is AnswerFormat.boxed:
        parsed = parse(text, extraction_config=[LatexExtractionConfig(boxed_match_priority=0)])
        answer = parsed[1] if len(parsed) > 1 else ""
    else:
        answer = text.strip()
    return answer or None


def extract_completion_answer(completion: str) -> Optional[str]:
    _, mark, after = completion.partition(GSM8K_MARK)
    if mark:  # the GSM8K convention: the answer is what directly follows "####"
        words = after.split(maxsplit=1)
        completion = words[0].rstrip(".") if words else ""
    parsed = parse(completion)
    if not parsed:
        return None
    return parsed[1] if len(parsed) > 1 else str(parsed[0])


@lru_cache(maxsize=65536)
def _parsed(answer: str) -> tuple:
    # In $...$ so that LaTeX answers ("\frac{1}{2}") parse as LaTeX, not as text.
    return tuple(parse(f"${answer}$") or parse(answer))


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
        gold, predicted = _parsed(problem.answer), _parsed(answer)
        return bool(gold) and bool(predicted) and verify(list(gold), list(predicted))


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
