"""The reward-shaped next-token loss (PAPER.md sections 3-4).

Cross-entropy is a one-step policy gradient whose reward is 1/p on the ground truth and 0
elsewhere. Here the reward is reshaped: beta rescales the ground-truth reward, and the
negatives get lambda_top inside the top-k of the current distribution and lambda_tail
outside it. The expectation over the vocabulary is exact, so with detached weights
w_a = p_a * r_a and W = sum_a w_a:

    loss_t = -sum_a w_a * log p_a          d loss_t / d z_j = p_j * W - w_j

Three paths give the same numbers:
- `shaped_ntp_loss_reference`: autograd through fp32 logits; short enough to check by eye.
- `shaped_ntp_loss`: over given logits, fp32 one chunk of tokens at a time; the gradient
  is formed in the forward pass, so no fp32 [tokens x vocab] tensor exists for the batch.
- `shaped_ntp_loss_fused`: from hidden states and the LM head weight, through the chunked
  head that RL's log-probs use too (`lm_head.ChunkedHead`); logits exist only one chunk at a
  time, and the chunk's gradient flows straight into the hidden states and the weight, so
  no [tokens x vocab] tensor exists in any dtype.

The two chunked paths take `compile=True` to run each chunk through torch.compile, which
fuses the per-chunk work into a few passes over the logits (`_shaped_chunk_fusable`).
The top-k set is defined by its threshold, the k-th largest logit: tokens tied with it
share the remaining places evenly, so no path depends on how `topk` breaks ties.

All three average over the tokens whose label is not `ignore_index`, as CE does, and report
diagnostics as token means: the surrogate is not a likelihood, so NLL, entropy, top-1
accuracy, target probability and top-k / tail mass are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

from ntp_rl.lm_head import ChunkedHead, head_dtype

# 1 - p is clamped here before it is raised to the power beta: beta < 0 would otherwise
# blow up on tokens the model already predicts with certainty.
ONE_MINUS_P_MIN = 1e-6

STAT_NAMES = ("nll", "entropy", "accuracy", "target_prob", "topk_mass", "tail_mass")


@dataclass(frozen=True)
class RewardShaping:
    beta: float = 0.0
    lambda_top: float = 0.0
    lambda_tail: float = 0.0
    k: int = 100
    positive_form: str = "exponent"  # or "multiplicative", "constant"

    def __post_init__(self) -> None:
        if self.positive_form not in ("exponent", "multiplicative", "constant"):
            raise ValueError(f"positive_form must be exponent, multiplicative or constant, not {self.positive_form!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, not {self.k}")
        for name in ("beta", "lambda_top", "lambda_tail"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    @classmethod
    def from_config(cls, loss_cfg: Any) -> "RewardShaping":
        return cls(
            beta=float(loss_cfg.beta),
            lambda_top=float(loss_cfg.lambda_top),
            lambda_tail=float(loss_cfg.lambda_tail),
            k=int(loss_cfg.k),
            positive_form=loss_cfg.positive_form.value,
        )


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar surrogate, differentiable
    stats: dict[str, torch.Tensor]  # detached token means (STAT_NAMES) and num_tokens


def positive_weight(log_p_target: torch.Tensor, shaping: RewardShaping) -> torch.Tensor:
    """w_y = p_y * r_pos(p_y), in fp32. Exactly 1 (cross-entropy) when beta = 0 in the exponent and
    multiplicative forms; p_y (DFT) in the constant form."""
    one_minus_p = (-torch.expm1(log_p_target)).clamp_min(ONE_MINUS_P_MIN)
    scale = torch.exp(shaping.beta * torch.log(one_minus_p))  # (1 - p) ** beta
    if shaping.positive_form == "multiplicative":
        return scale  # p * (1/p) * (1 - p)**beta
    if shaping.positive_form == "constant":
        return torch.exp(log_p_target) * scale  # p * (1 - p)**beta
    return torch.exp(log_p_target * (1.0 - scale))  # p * (1/p) ** ((1 - p)**beta)


class _ChunkResult(NamedTuple):
    loss_sum: torch.Tensor
    stat_sums: torch.Tensor  # [len(STAT_NAMES)]
    grad_logits: Optional[torch.Tensor]  # d loss_sum / d logits
    per_token: Optional[dict[str, torch.Tensor]] = None  # the statistics token by token, when asked for


# Tokens tied with the k-th largest logit share the top-k's remaining places evenly: each
# counts as `share` = (k - #greater) / #tied of a top-k member. With bf16 logits ties at the
# threshold are common, and this keeps the loss independent of how topk breaks them; the
# sums over the top-k are the same whichever tied tokens a tie-break would pick.


def _shaped_chunk(logits: torch.Tensor, targets: torch.Tensor, shaping: RewardShaping, with_grad: bool,
                  per_token: bool = False) -> _ChunkResult:
    """Surrogate, diagnostics and (optionally) the analytic gradient for rows that all count.

    `logits` is fp32 [n, V] and is overwritten (it becomes log p): at large vocabularies the
    chunk's [n, V] buffers are the memory cost of the loss, so only two are ever alive.
    No autograd happens here.
    """
    vocab = logits.shape[-1]
    k = min(shaping.k, vocab)
    lambda_gap = shaping.lambda_top - shaping.lambda_tail
    tied_rows = tied_cols = None
    if lambda_gap == 0.0 or k == vocab:
        # Top-k membership cancels out of the loss: only the top-k mass diagnostic needs it.
        top_z, top_idx = logits.topk(k, dim=-1, sorted=False)
        thr = top_z.amin(-1)
        share = torch.ones_like(thr)
    else:
        # Sorted top-(k+1): column k-1 is the threshold, and column k tells whether topk left
        # out a token tied with it. Only then are the tied tokens located in the whole row.
        top_z, top_idx = logits.topk(k + 1, dim=-1)
        thr = top_z[:, k - 1]
        ties_left_out = bool((top_z[:, k] == thr).any())
        top_z, top_idx = top_z[:, :k], top_idx[:, :k]
        tied_in_top = (top_z == thr[:, None]).sum(-1)
        if ties_left_out:
            tied_rows, tied_cols = (logits == thr[:, None]).nonzero(as_tuple=True)
            share = tied_in_top / torch.bincount(tied_rows, minlength=logits.shape[0])
        else:
            share = torch.ones_like(thr)
    z_y = logits.gather(1, targets[:, None]).squeeze(1)
    y_top = torch.where(z_y > thr, 1.0, torch.where(z_y == thr, share, 0.0))  # the target's top-k membership

    lse = torch.logsumexp(logits, dim=-1)
    log_p = logits.sub_(lse[:, None])
    p = log_p.exp()
    log_p_y = log_p.gather(1, targets[:, None]).squeeze(1)
    p_y = log_p_y.exp()
    w_y = positive_weight(log_p_y, shaping)
    log_p_top = log_p.gather(1, top_idx)
    p_top = log_p_top.exp()
    accuracy = (log_p.argmax(-1) == targets).float()

    # sum_a p_a log p_a over all tokens, over the top-k, and the ground truth's own term,
    # so the negatives' sums follow without building a [n, V] weight tensor. (A row-wise
    # dot product: p * log_p would be one more [n, V] buffer.)
    plogp_all = (p.unsqueeze(1) @ log_p.unsqueeze(2)).view(-1)
    plogp_top = (p_top * log_p_top).sum(-1)
    plogp_y = p_y * log_p_y
    mass_top = p_top.sum(-1)
    neg_top_plogp = plogp_top - y_top * plogp_y
    neg_tail_plogp = plogp_all - plogp_top - (1.0 - y_top) * plogp_y
    neg_top_mass = mass_top - y_top * p_y
    neg_tail_mass = (1.0 - mass_top) - (1.0 - y_top) * p_y

    loss = -(w_y * log_p_y + shaping.lambda_top * neg_top_plogp + shaping.lambda_tail * neg_tail_plogp)
    stat_sums = torch.stack(
        [(-log_p_y).sum(), (-plogp_all).sum(), accuracy.sum(), p_y.sum(), mass_top.sum(), (1.0 - mass_top).sum()]
    )

    grad = None
    if with_grad:
        total_w = w_y + shaping.lambda_top * neg_top_mass + shaping.lambda_tail * neg_tail_mass
        # d/dz_j = p_j * W - w_j with w_j = lambda_j * p_j for negatives: start from the
        # tail's coefficient everywhere, correct the top-k, then set the ground truth.
        grad = p.mul_(total_w[:, None] - shaping.lambda_tail)
        if lambda_gap != 0.0:
            grad.scatter_add_(1, top_idx, -lambda_gap * p_top)
            if tied_rows is not None:  # every tied token gets its share of the top-k's coefficient
                p_tied = (thr - lse).exp()
                tied_grad = p_tied * (total_w - shaping.lambda_tail - lambda_gap * share)
                grad.index_put_((tied_rows, tied_cols), tied_grad[tied_rows])
        grad.scatter_(1, targets[:, None], (p_y * total_w - w_y)[:, None])
    tokens = None
    if per_token:
        tokens = {"nll": -log_p_y, "entropy": -plogp_all, "accuracy": accuracy, "target_prob": p_y,
                  "topk_mass": mass_top, "target_rank": (log_p > log_p_y[:, None]).sum(-1) + 1}
    return _ChunkResult(loss.sum(), stat_sums, grad, tokens)


def _shaped_chunk_fusable(
    logits: torch.Tensor,
    targets: torch.Tensor,
    shaping: RewardShaping,
    grad_dtype: Optional[torch.dtype],
) -> _ChunkResult:
    """`_shaped_chunk` written as whole-row expressions for torch.compile to fuse.

    Eager, this would allocate a dozen [n, V] temporaries; compiled, it becomes a few
    passes over the chunk (Triton kernels on GPU, vectorised C++ on CPU), reads the logits
    in their own dtype and writes the gradient in `grad_dtype`. The top-k enters only
    through its threshold, so after the selection everything is elementwise or a row sum.
    """
    k = min(shaping.k, logits.shape[-1])
    lambda_top, lambda_tail = shaping.lambda_top, shaping.lambda_tail
    # topk reads the logits in their own dtype (the upcast is exact), so an fp32 copy of a
    # bf16 chunk is never materialised for it: `z` only feeds fused kernels.
    threshold = logits.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True).float()
    z = logits.float()
    greater = z > threshold
    tied = z == threshold
    share = (k - greater.sum(-1, keepdim=True)) / tied.sum(-1, keepdim=True)
    in_top = torch.where(greater, 1.0, torch.where(tied, share, 0.0))
    log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
    p = log_p.exp()
    plogp = p * log_p
    plogp_all = plogp.sum(-1)
    plogp_top = (plogp * in_top).sum(-1)
    mass_top = (p * in_top).sum(-1)
    log_p_y = log_p.gather(1, targets[:, None]).squeeze(1)
    y_top = in_top.gather(1, targets[:, None]).squeeze(1)
    p_y = log_p_y.exp()
    w_y = positive_weight(log_p_y, shaping)
    plogp_y = p_y * log_p_y
    neg_top_plogp = plogp_top - y_top * plogp_y
    neg_tail_plogp = plogp_all - plogp_top - (1.0 - y_top) * plogp_y
    loss = -(w_y * log_p_y + lambda_top * neg_top_plogp + lambda_tail * neg_tail_plogp)
    accuracy = (z.argmax(-1) == targets).float()
    stat_sums = torch.stack(
        [(-log_p_y).sum(), (-plogp_all).sum(), accuracy.sum(), p_y.sum(), mass_top.sum(), (1.0 - mass_top).sum()]
    )
    grad = None
    if grad_dtype is not None:
        neg_top_mass = mass_top - y_top * p_y
        neg_tail_mass = (1.0 - mass_top) - (1.0 - y_top) * p_y
        total_w = (w_y + lambda_top * neg_top_mass + lambda_tail * neg_tail_mass)[:, None]
        lambda_j = lambda_tail + (lambda_top - lambda_tail) * in_top
        is_target = torch.arange(z.shape[1], device=z.device) == targets[:, None]
        grad = torch.where(is_target, p * total_w - w_y[:, None], p * (total_w - lambda_j)).to(grad_dtype)
    return _ChunkResult(loss.sum(), stat_sums, grad)


_compiled_chunk = None


def _chunk(logits: torch.Tensor, targets: torch.Tensor, shaping: RewardShaping, grad_dtype: Optional[torch.dtype],
           compiled: bool) -> _ChunkResult:
    """One chunk of rows that all count: `logits` [n, V] in any float dtype, consumed (it may be overwritten)."""
    if not compiled:
        out = _shaped_chunk(logits.float(), targets, shaping, grad_dtype is not None)
        grad = out.grad_logits
        return out if grad is None or grad.dtype == grad_dtype else out._replace(grad_logits=grad.to(grad_dtype))
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_shaped_chunk_fusable, fullgraph=True)
    return _compiled_chunk(logits, targets, shaping, grad_dtype)


def token_statistics(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Per token: NLL, entropy (nats), whether the target is the top choice, its probability, the
    top-k mass, and the target's rank (1 = top; ties count in the target's favour).

    The same code as the loss's statistics (its eager chunk, without the gradient), so what
    `eval` measures on held-out text and what training logs are one implementation.
    """
    # A copy (the chunk overwrites its input), with -inf logits (a masked vocabulary) made the
    # most negative float: p is then exactly 0 and p * log p is 0, not nan.
    z = logits.to(torch.float32, copy=True).clamp_min_(torch.finfo(torch.float32).min)
    return _shaped_chunk(z, targets, RewardShaping(k=min(k, logits.shape[-1])), with_grad=False, per_token=True).per_token


def _finish(loss_sum: torch.Tensor, stat_sums: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    denom = max(num_tokens, 1)
    stats = {name: value / denom for name, value in zip(STAT_NAMES, stat_sums.detach())}
    stats["num_tokens"] = torch.tensor(float(num_tokens), device=stat_sums.device)
    return loss_sum / denom, stats


def _flatten(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = labels.reshape(-1)
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return rows, labels[rows]


def shaped_ntp_loss_reference(
    logits: torch.Tensor, labels: torch.Tensor, shaping: RewardShaping, ignore_index: int = -100
) -> LossOutput:
    """Plain autograd over the whole fp32 logits: the surrogate with detached weights."""
    vocab = logits.shape[-1]
    rows, targets = _flatten(labels, ignore_index)
    z = logits.reshape(-1, vocab)[rows].float()
    log_p = torch.log_softmax(z, dim=-1)
    with torch.no_grad():
        lp = log_p.detach()
        k = min(shaping.k, vocab)
        threshold = z.topk(k, dim=-1).values[:, -1:]
        greater, tied = z > threshold, z == threshold
        share = (k - greater.sum(-1, keepdim=True)) / tied.sum(-1, keepdim=True)  # see _shaped_chunk
        tied_reward = shaping.lambda_tail + (shaping.lambda_top - shaping.lambda_tail) * share
        reward = torch.where(greater, shaping.lambda_top, torch.where(tied, tied_reward, shaping.lambda_tail))
        del greater, tied
        weights = reward.mul_(lp.exp())
        weights.scatter_(1, targets[:, None], positive_weight(lp.gather(1, targets[:, None]), shaping))
        # The statistics, written out plainly: the chunked paths are checked against these.
        p = lp.exp()
        lp_y = lp.gather(1, targets[:, None]).squeeze(1)
        mass_top = p.topk(k, dim=-1).values.sum(-1)  # tied tokens have equal p: any tie-break gives this sum
        stats = torch.stack([-lp_y.sum(), -torch.where(p > 0, p * lp, 0.0).sum(), (z.argmax(-1) == targets).sum(),
                             lp_y.exp().sum(), mass_top.sum(), (1.0 - mass_top).sum()]).float()
    loss_sum = -(weights * log_p).sum()
    loss, stats = _finish(loss_sum, stats, rows.numel())
    return LossOutput(loss, stats)


class _ShapedLossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shaping, chunk_size, ignore_index, compiled):  # type: ignore[override]
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        rows, targets = _flatten(labels, ignore_index)
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        loss_sum = flat.new_zeros((), dtype=torch.float32)
        stat_sums = flat.new_zeros(len(STAT_NAMES), dtype=torch.float32)
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            out = _chunk(flat[chunk_rows], targets[start : start + chunk_size], shaping,
                         grad.dtype if grad is not None else None, compiled)
            loss_sum += out.loss_sum
            stat_sums += out.stat_sums
            if grad is not None:
                grad.index_copy_(0, chunk_rows, out.grad_logits)
        num_tokens = rows.numel()
        if grad is not None:
            grad.div_(max(num_tokens, 1))
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stat_sums)
        return loss_sum / max(num_tokens, 1), stat_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).view(ctx.logits_shape), None, None, None, None, None


def shaped_ntp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shaping: RewardShaping,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    compile: bool = False,
) -> LossOutput:
    """The shaped loss over given logits, in fp32 chunks of `chunk_size` tokens.

    `compile=True` runs each chunk through torch.compile (see `_shaped_chunk_fusable`).
    """
    loss, stat_sums = _ShapedLossFromLogits.apply(logits, labels, shaping, chunk_size, ignore_index, compile)
    _, stats = _finish(loss, stat_sums, int((labels != ignore_index).sum()))
    return LossOutput(loss, stats)


class _FusedLinearShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shaping, chunk_size, ignore_index, compiled):  # type: ignore[override]
        dtype = head_dtype(hidden, weight)
        rows, targets = _flatten(labels, ignore_index)
        num_tokens = rows.numel()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        head = ChunkedHead(hidden.reshape(-1, hidden.shape[-1]), weight, dtype, chunk_size, rows=rows,
                           need_hidden=need_h, need_weight=need_w)
        loss_sum = hidden.new_zeros((), dtype=torch.float32)
        stat_sums = hidden.new_zeros(len(STAT_NAMES), dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for part, h, logits in head.chunks():
                out = _chunk(logits, targets[part], shaping, dtype if need_h or need_w else None, compiled)
                loss_sum += out.loss_sum
                stat_sums += out.stat_sums
                if out.grad_logits is not None:
                    head.backprop(part, h, out.grad_logits)
        scale = 1.0 / max(num_tokens, 1)
        grad_hidden, grad_weight = head.grad_hidden, head.grad_weight
        if need_h:
            grad_hidden.mul_(scale)
        if need_w:
            grad_weight.mul_(scale)
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(stat_sums)
        return loss_sum * scale, stat_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_loss.to(grad_hidden.dtype)).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def shaped_ntp_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shaping: RewardShaping,
    ignore_index: int = -100,
    chunk_size: int = 1024,
    compile: bool = False,
) -> LossOutput:
    """The shaped loss of `hidden @ weight.T` (an LM head without bias), chunk by chunk.

    `compile=True` runs each chunk through torch.compile (see `_shaped_chunk_fusable`).
    """
    loss, stat_sums = _FusedLinearShapedLoss.apply(hidden, weight, labels, shaping, chunk_size, ignore_index, compile)
    _, stats = _finish(loss, stat_sums, int((labels != ignore_index).sum()))
    return LossOutput(loss, stats)
