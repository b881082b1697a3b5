"""reasoning-gym datasets as tasks: generated offline from a seed, scored by the package itself.

`task.dataset` names any of reasoning-gym's datasets (chain_sum, basic_arithmetic,
gsm_symbolic, countdown, ...); `task.dataset_kwargs` is that dataset's own config. The
train and test splits are the same generator under two seeds derived from `task.seed`;
reasoning-gym draws problems independently, so a small problem space can repeat a problem
in both.

Completions answer inside <answer>...</answer>, as reasoning-gym's prompts ask; a
completion is right when the dataset's `score_answer` gives it full marks (some datasets
give partial credit for near misses, which counts as wrong here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import reasoning_gym
from omegaconf import OmegaConf
from reasoning_gym.factory import DATASETS
from reasoning_gym.utils import SYSTEM_PROMPTS
from reasoning_gym.utils import extract_answer as extract_tagged_answer

from ntp_rl.seeding import mix_seed
from ntp_rl.errors import ConfigError, first_line
from ntp_rl.tasks import TASK_SPLITS, TaskProblem, fill_prompt, register, template_stop_strings

# A base model continues text, so reasoning-gym's instructions come first and the answer is cued.
DEFAULT_TEMPLATE = SYSTEM_PROMPTS["default"] + "\nQuestion: {question}\nAnswer:"


@dataclass
class ReasoningGymTask:
    dataset: str
    seed: int
    name: str
    kwargs: dict = field(default_factory=dict)
    prompt_template: str = DEFAULT_TEMPLATE

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return template_stop_strings(self.prompt_template)

    def __post_init__(self) -> None:
        # Scoring needs the dataset's config (tolerances, formats), not its problems.
        self._scorer = self._create(seed=0, size=1)

    def _create(self, seed: int, size: int) -> Any:
        return reasoning_gym.create_dataset(self.dataset, seed=seed, size=size, **self.kwargs)

    def problems(self, split: str, n: int) -> list[TaskProblem]:
        if split not in TASK_SPLITS:
            raise ValueError(f"split must be one of {TASK_SPLITS}, not {split!r}")
        data = self._create(seed=mix_seed("reasoning_gym", self.dataset, self.seed, split) % 2**31, size=n)
        return [
            TaskProblem(id=f"{split}-{i}", prompt=fill_prompt(self.prompt_template, entry["question"]),
                        answer=str(entry["answer"]), meta={"entry": entry})
            for i, entry in enumerate(data)
        ]

    def extract_answer(self, completion: str) -> Optional[str]:
        return extract_tagged_answer(completion) or None  # empty tags give no answer

    def answer_matches(self, answer: str, problem: TaskProblem) -> bool:
        return self._scorer.score_answer(answer, problem.meta["entry"]) >= 1.0


@register("reasoning_gym")
def build(task_cfg: Any) -> ReasoningGymTask:
    name = getattr(task_cfg, "dataset", None)
    if not name:
        raise ConfigError("task.dataset", f"is required with task.kind=reasoning_gym; choose one of: {', '.join(sorted(DATASETS))}")
    if name not in DATASETS:
        raise ConfigError("task.dataset", f"unknown reasoning-gym dataset; choose one of: {', '.join(sorted(DATASETS))}", name)
    kwargs = getattr(task_cfg, "dataset_kwargs", None) or {}
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if OmegaConf.is_config(kwargs) else dict(kwargs)
    try:
        return ReasoningGymTask(dataset=name, seed=int(task_cfg.seed), name=getattr(task_cfg, "name", name), kwargs=kwargs,
                                prompt_template=getattr(task_cfg, "prompt_template", None) or DEFAULT_TEMPLATE)
    except (TypeError, ValueError, AssertionError) as exc:  # reasoning-gym checks its configs with asserts
        raise ConfigError("task.dataset_kwargs", f"not accepted by reasoning-gym's {name}: {first_line(exc)}", kwargs) from exc
