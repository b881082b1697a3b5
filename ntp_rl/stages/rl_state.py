"""What every phase of `ntp-rl rl` reads and updates: the run's models, settings and position."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ntp_rl.generation import Generator, Sampling
from ntp_rl.rl.plateau import Plateau
from ntp_rl.rl.rollout import PromptStream
from ntp_rl.stages.session import StageSession
from ntp_rl.tasks import Task, TaskProblem


@dataclass
class RLState:
    """The run's models and settings, and where it is: what every phase reads and updates."""

    cfg: Any
    session: StageSession
    task: Task
    tokenizer: Any
    model: torch.nn.Module  # PolicyLogprobs around the policy, prepared by Accelerate
    lm: torch.nn.Module  # the policy itself, a Hugging Face model
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: Optional[torch.nn.Module]  # PolicyLogprobs around frozen init_from weights for the KL term, or None
    stream: PromptStream  # the train prompts, in a reshuffled order that depends on position only
    eval_problems: list[TaskProblem]
    rollouts: Generator  # rl's sampling engine (`generator`), for rollouts and held-out checks
    sampling: Sampling
    eval_sampling: Sampling
    per_rank: int  # prompts (= groups) each process samples and trains on per step
    model_dir: str  # the checkpoint (or hub name) the policy was loaded from: where a vLLM engine starts
    step: int = 0
    prompt_position: int = 0  # prompts taken from the stream so far, over all processes
    eval_before: Optional[dict] = None
    first_step_metrics: Optional[dict] = None
    empty_mini_batches: int = 0  # over the run: updates skipped because no response token had a loss
    nonfinite_skips: int = 0  # over the run: updates dropped for a non-finite gradient (rl.on_nonfinite=skip)
    short_steps: int = 0  # over the run: steps whose sampling rounds ran out before the batch was full
    equal_reward_steps: int = 0  # over the run: steps in which every group had equal rewards (nothing to learn)
    filled_groups: int = 0  # over the run: batch places those steps left without a group to train on
    engine_stale: bool = False  # the policy has changed since the sampling engine last took its weights
    plateau: Optional[Plateau] = None  # rl.plateau's rule, when set
    stopped_at: Optional[dict] = None  # the held-out check where rl.plateau found accuracy levelled off

    @property
    def updates_per_step(self) -> int:
        return self.cfg.rl.num_iterations * self.cfg.rl.num_mini_batches

    @property
    def separate_old_pass(self) -> bool:
        # With a single update the policy that sampled is the one being updated: its log-probs
        # are the current ones, detached, and need no pass of their own.
        return self.updates_per_step > 1
