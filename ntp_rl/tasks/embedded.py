"""The embedded task: arithmetic word problems from splits the pre-training corpus never shows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ntp_rl.data.corpus import extract_answer, sample_problems
from ntp_rl.errors import ConfigError
from ntp_rl.tasks import TaskProblem, fill_prompt, register, task_splits

# task split -> corpus split. "pretrain" is never served: those problems were trained on.
CORPUS_SPLIT = {"train": "rl", "validation": "validation", "test": "test"}


@dataclass
class EmbeddedTask:
    difficulty: int
    seed: int
    name: str = "embedded"
    prompt_template: Optional[str] = None  # null: the pre-training format, "Question: ...\nAnswer:"
    # A completion ends at EOS; should a model run on into a new problem, that is cut off.
    stop_strings: tuple[str, ...] = ("\nQuestion:",)

    def problems(self, split: str, n: int) -> list[TaskProblem]:
        if split not in task_splits("embedded"):
            raise ValueError(f"split must be one of {task_splits('embedded')}, not {split!r}")
        corpus_split = CORPUS_SPLIT[split]
        return [
            TaskProblem(id=f"{corpus_split}-{i}", answer=p.answer, meta={"question": p.question},
                        prompt=fill_prompt(self.prompt_template, p.question) if self.prompt_template else p.prompt)
            for i, p in enumerate(sample_problems(corpus_split, self.seed, self.difficulty, n))
        ]

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_answer(completion)

    def answer_matches(self, answer: str, problem: TaskProblem) -> bool:
        return answer == problem.answer  # both are canonical integers


@register("embedded")
def build(task_cfg: Any) -> EmbeddedTask:
    if not 1 <= task_cfg.difficulty <= 5:
        raise ConfigError("task.difficulty", "must be in 1..5", task_cfg.difficulty)
    # getattr: a TaskConfig dataclass, a composed config, or a partial one all work.
    return EmbeddedTask(difficulty=int(task_cfg.difficulty), seed=int(task_cfg.seed),
                        name=getattr(task_cfg, "name", "embedded"), prompt_template=getattr(task_cfg, "prompt_template", None))
