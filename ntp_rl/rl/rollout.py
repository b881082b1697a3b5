"""Rollouts: which prompts, sampled how, kept or dropped, and turned into training tensors.

Reproducibility rests on two pure functions: the prompts of a step come from the global
prompt position (`PromptStream.take`), and the samples of each generate call from
`rollout_seed(run seed, step, round, offset)`, where offset is the global index of the
call's first prompt. A resumed run, or the same global batch split over another number
of processes, therefore samples the same completions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ntp_rl import moe
from ntp_rl.generation import Generator, Sampling
from ntp_rl.lm_head import has_plain_linear_head, token_logprobs_fused
from ntp_rl.seeding import mix_seed
from ntp_rl.tasks import Task, TaskProblem, score


class PromptStream:
    """An endless stream over a pool of problems, reshuffled every pass; `take` is pure in position."""

    def __init__(self, problems: Sequence[TaskProblem], seed: int):
        if not problems:
            raise ValueError("the prompt pool is empty")
        self.problems = list(problems)
        self.seed = seed
        self._cached: tuple[int, list[int]] | None = None

    def take(self, position: int, n: int) -> list[TaskProblem]:
        out = []
        for index in range(position, position + n):
            epoch, offset = divmod(index, len(self.problems))
            out.append(self.problems[self._order(epoch)[offset]])
        return out

    def _order(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed("prompts", self.seed, epoch))
            self._cached = (epoch, torch.randperm(len(self.problems), generator=generator).tolist())
        return self._cached[1]


@dataclass
class Group:
    """One prompt's G samples and their rewards; a group never spans processes."""

    problem_id: str
    prompt_ids: list[int]
    responses: list[list[int]]  # sampled token ids, as generated (EOS included when it ended there)
    rewards: list[float]
    correct: list[bool]
    truncated: list[bool]
    # The engine's log-prob of each sampled token (vLLM), for the train/rollout mismatch; None when it gives none.
    logprobs: Optional[list[list[float]]] = None

    @property
    def informative(self) -> bool:
        """Rewards that differ: only then do group-relative advantages say anything."""
        return len(set(self.rewards)) > 1


def sample_groups(generator: Generator, task: Task, tokenizer: Any, problems: Sequence[TaskProblem], num_generations: int,
                  sampling: Sampling, prompts_per_call: int, seed_at: Callable[[int], int], format_weight: float) -> list[Group]:
    """G scored samples for each problem, generated `prompts_per_call` prompts at a time.

    `seed_at(i)` gives the seed of the call whose first prompt is problems[i].
    """
    groups = []
    for start in range(0, len(problems), prompts_per_call):
        chunk = problems[start:start + prompts_per_call]
        samples = generator.generate([p.prompt for p in chunk], num_generations, sampling, seed_at(start))
        for problem, completions in zip(chunk, samples):
            scores = [score(task, c.text, problem, format_weight) for c in completions]
            groups.append(Group(
                problem_id=problem.id,
                prompt_ids=tokenizer(problem.prompt, add_special_tokens=False)["input_ids"],
                responses=[c.token_ids for c in completions],
                rewards=[r for r, _ in scores],
                correct=[c for _, c in scores],
                truncated=[c.truncated for c in completions],
                logprobs=None if any(c.logprobs is None for c in completions) else [c.logprobs for c in completions],
            ))
    return groups


@dataclass
class CollectedGroups:
    groups: list[Group]  # the step's batch, in global order: the groups trained on first, then any filler
    generated: list[Group]  # every group sampled in this step
    rounds: int
    dropped: int  # groups with equal rewards left out of the batch
    filled: int  # equal-reward groups holding a place in the batch because max_rounds ran out; never trained on

    def trained(self, dynamic: bool) -> list[bool]:
        """Which of `groups` get a loss: with dynamic sampling only those whose rewards differ."""
        return [g.informative or not dynamic for g in self.groups]


def collect_groups(sample_round: Callable[[int], list[Group]], target: int, dynamic: bool, max_rounds: int) -> CollectedGroups:
    """Dynamic sampling (DAPO): drop groups whose rewards are all equal, sample more until `target` are kept.

    `sample_round(r)` returns round r's groups of all processes in global order, so every
    process takes the same decisions. When max_rounds runs out first, the batch is topped
    up with equal-reward groups so that every process still holds the same number of
    sequences, but these fillers get no loss (`trained`): the update is the token mean over
    the groups whose rewards differ, as if the batch had only them (verl's DAPO trains on
    the informative groups alone). Had the fillers' tokens counted in the mean, every update
    would shrink by their share, and that share depends on the pre-trained prior, the very
    variable a comparison of priors studies.
    """
    generated: list[Group] = []
    kept: list[Group] = []
    rounds = 0
    while True:
        new = sample_round(rounds)
        rounds += 1
        generated += new
        kept += [g for g in new if g.informative or not dynamic]
        if len(kept) >= target or rounds >= max_rounds or not dynamic:
            break
    filler = [g for g in generated if not g.informative][: max(0, target - len(kept))]
    uninformative = sum(not g.informative for g in generated)
    return CollectedGroups(groups=(kept + filler)[:target], generated=generated, rounds=rounds,
                           dropped=uninformative - len(filler) if dynamic else 0, filled=len(filler) if dynamic else 0)


@dataclass
class RolloutBatch:
    """Prompt + response sequences, right-padded, with what the loss needs per sequence and per token.

    Token tensors are [N, L-1] and aligned with the labels input_ids[:, 1:].
    """

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    response_mask: torch.Tensor  # [N, L-1] bool: the label is a response token that gets a loss
    advantages: torch.Tensor  # [N]
    old_logp: Optional[torch.Tensor] = None  # [N, L-1] log-probs under the rollout policy
    ref_logp: Optional[torch.Tensor] = None  # [N, L-1] log-probs under the reference model
    rollout_logp: Optional[torch.Tensor] = None  # [N, L-1] the sampling engine's own log-probs (vLLM), zero off the response

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows start..stop, trimmed to their longest sequence."""
        return self.select(slice(start, stop))

    def select(self, index: "slice | Sequence[int]") -> "RolloutBatch":
        """The rows `index` picks, in that order, trimmed to their longest sequence."""
        index = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long,
                                                                        device=self.input_ids.device)
        length = int(self.attention_mask[index].sum(1).max())
        tokens = lambda t: None if t is None else t[index, : length - 1]  # noqa: E731
        return RolloutBatch(input_ids=self.input_ids[index, :length],
                            attention_mask=self.attention_mask[index, :length],
                            response_mask=tokens(self.response_mask), advantages=self.advantages[index],
                            old_logp=tokens(self.old_logp), ref_logp=tokens(self.ref_logp),
                            rollout_logp=tokens(self.rollout_logp))

    def lengths(self) -> list[int]:
        """Each row's prompt + response tokens (what it costs a forward)."""
        return self.attention_mask.sum(1).tolist()

    def to(self, device: torch.device) -> "RolloutBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RolloutBatch(move(self.input_ids), move(self.attention_mask), move(self.response_mask),
                            move(self.advantages), move(self.old_logp), move(self.ref_logp), move(self.rollout_logp))


def plan_micro_batches(lengths: Sequence[int], max_rows: int, max_tokens: Optional[int]) -> list[list[int]]:
    """Which rows go into each micro-batch (each is padded to its longest row).

    By rows (`max_tokens` None): runs of `max_rows` rows in order. By tokens: rows longest
    first, each micro-batch taking rows while rows x its longest row stays within `max_tokens`
    (one row at least, however long), so rows of like length share a micro-batch and padding
    is small. The loss is a sum over tokens divided by the global count, so how rows are
    grouped changes no update, only memory and speed.
    """
    if max_tokens is None:
        return [list(range(i, min(i + max_rows, len(lengths)))) for i in range(0, len(lengths), max_rows)]
    plan: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if plan and (len(plan[-1]) + 1) * lengths[plan[-1][0]] <= max_tokens:
            plan[-1].append(row)
        else:
            plan.append([row])
    return plan


def split_plan(plan: list[list[int]], count: int) -> list[list[int]]:
    """`plan` cut into exactly `count` micro-batches by halving the one of most rows, again and again.

    Every process must run the same number of forwards (FSDP gathers parameters in each), while
    a token budget packs each process's rows into as many micro-batches as they need.
    """
    plan = [list(m) for m in plan]
    if not len(plan) <= count <= sum(len(m) for m in plan):
        raise ValueError(f"cannot cut {len(plan)} micro-batches into {count}")
    while len(plan) < count:
        i = max(range(len(plan)), key=lambda j: len(plan[j]))
        half = len(plan[i]) // 2
        plan[i:i + 1] = [plan[i][:half], plan[i][half:]]
    return plan


def deal_groups(num_groups: int, num_mini_batches: int, world: int, rank: int) -> list[int]:
    """Which of a step's groups (in collected order) this process trains on, mini-batch after mini-batch.

    Group i goes to mini-batch i mod M, so groups trained on (collected first) are spread
    evenly over the updates and filler groups over their ends; each mini-batch is then split
    between the processes in order. A global mini-batch therefore holds the same groups
    whatever the number of processes, and so does each update.
    """
    per_rank = num_groups // num_mini_batches // world
    return [position * num_mini_batches + m for m in range(num_mini_batches)
            for position in range(rank * per_rank, (rank + 1) * per_rank)]


def build_batch(groups: Sequence[Group], advantages: torch.Tensor, pad_id: int, mask_truncated: bool,
                trained: Optional[Sequence[bool]] = None) -> RolloutBatch:
    """One row per sample, group after group; `advantages` is [groups, G]; groups not `trained` get no loss."""
    trained = [True] * len(groups) if trained is None else trained
    rows = [(g.prompt_ids, response, bool(g.truncated[j]) and mask_truncated or not keep)
            for g, keep in zip(groups, trained) for j, response in enumerate(g.responses)]
    length = max(len(p) + len(r) for p, r, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    response_mask = torch.zeros((len(rows), length - 1), dtype=torch.bool)
    for i, (prompt, response, masked) in enumerate(rows):
        n = len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[i, :n] = 1
        if not masked:
            # label position t predicts token t+1: the response's labels start at len(prompt) - 1
            response_mask[i, len(prompt) - 1:n - 1] = True
    batch = RolloutBatch(input_ids, attention_mask, response_mask, advantages.reshape(-1).float())
    if groups and all(g.logprobs is not None for g in groups):
        batch.rollout_logp = torch.zeros((len(rows), length - 1), dtype=torch.float32)
        engine_logprobs = [lp for g in groups for lp in g.logprobs]
        for i, ((prompt, response, _), logprobs) in enumerate(zip(rows, engine_logprobs)):
            batch.rollout_logp[i, len(prompt) - 1:len(prompt) - 1 + len(response)] = torch.tensor(logprobs)
    return batch


class PolicyLogprobs(nn.Module):
    """A causal LM whose forward gives a rollout batch's per-token log-probs (and entropy).

    Only the response positions' hidden rows go through the LM head, a chunk at a time
    (`lm_head.token_logprobs_fused`), so no [response tokens x vocab] tensor exists. A head
    that is not a plain linear map (a bias, a soft-cap) takes `materialised_logprobs` instead.
    Wrapping the LM, as `models.ShapedLossLM` does for pre-training, keeps DDP's and FSDP's hooks
    around the LM head, which the chunked head reads directly.
    """

    def __init__(self, lm: nn.Module, chunk_size: int):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.chunked = has_plain_linear_head(lm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        moe.count_only(self.lm, attention_mask.bool())  # an MoE's load metric: padding is no load
        if not self.chunked:
            return materialised_logprobs(self.lm, input_ids, attention_mask, response_mask, temperature, with_entropy)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked, entropy = token_logprobs_fused(hidden[:, :-1][response_mask], self.lm.get_output_embeddings().weight,
                                               input_ids[:, 1:][response_mask], temperature, self.chunk_size, with_entropy)
        return _unflatten(picked, response_mask), None if entropy is None else _unflatten(entropy, response_mask)


def materialised_logprobs(lm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, temperature: float,
                          with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`PolicyLogprobs` through the model's full logits and an fp32 log-softmax of the response rows.

    For heads the chunked path cannot reproduce; its memory grows as response tokens x vocabulary.
    """
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    log_probs = torch.log_softmax(logits[response_mask].float() / temperature, dim=-1)  # [tokens, V]
    picked = log_probs.gather(-1, input_ids[:, 1:][response_mask].unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = _unflatten(-(log_probs.exp() * log_probs).sum(-1), response_mask)
    return _unflatten(picked, response_mask), entropy


def _unflatten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-response-token values -> [B, L-1] in fp32, zero off the response."""
    return torch.zeros(mask.shape, dtype=torch.float32, device=values.device).masked_scatter(mask, values)


def token_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token log-probs of the batch's labels (and the policy's entropy), zero off the response.

    `model` is a `PolicyLogprobs` (or DDP/FSDP around one). The logits are divided by the
    sampling temperature, so the ratio compares the distributions that were actually sampled from.
    """
    return model(batch.input_ids, batch.attention_mask, batch.response_mask, temperature, with_entropy)
