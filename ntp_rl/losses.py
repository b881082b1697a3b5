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
- `shaped_ntp_loss_fused`: from hidden states and the LM head weight; logits exist only
  one chunk at a time, and the chunk's gradient flows straight into the hidden states and
  the weight, so no [tokens x vocab] tensor exists in any dtype.

All three average over the tokens whose label is not `ignore_index`, as CE does, and report
diagnostics as token means: the surrogate is not a likelihood, so NLL, entropy, top-1
accuracy, target probability and top-k / tail mass are reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import torch

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
    positive_form: str = "exponent"  # or "multiplicative"

    def __post_init__(self) -> None:
        if self.positive_form not in ("exponent", "multiplicative"):
            raise ValueError(f"positive_form must be exponent or multiplicative, not {self.positive_form!r}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, not {self.k}")
        for name in ("beta", "lambda_top", "lambda_tail"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite")

    @classmethod
    def from_config(cls, loss_cfg: Any) -> "RewardShaping":
        form = loss_cfg.positive_form
        return cls(
            beta=float(loss_cfg.beta),
            lambda_top=float(loss_cfg.lambda_top),
            lambda_tail=float(loss_cfg.lambda_tail),
            k=int(loss_cfg.k),
            positive_form=getattr(form, "value", form),
        )


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar surrogate, differentiable
    stats: dict[str, torch.Tensor]  # detached token means (STAT_NAMES) and num_tokens


def positive_weight(log_p_target: torch.Tensor, shaping: RewardShaping) -> torch.Tensor:
    """w_y = p_y * r_pos(p_y), in fp32. Exactly 1 when beta = 0, in both forms."""
    one_minus_p = (-torch.expm1(log_p_target)).clamp_min(ONE_MINUS_P_MIN)
    scale = torch.exp(shaping.beta * torch.log(one_minus_p))  # (1 - p) ** beta
    if shaping.positive_form == "multiplicative":
        return scale  # p * (1/p) * (1 - p)**beta
    return torch.exp(log_p_target * (1.0 - scale))  # p * (1/p) ** ((1 - p)**beta)


class _ChunkResult(NamedTuple):
    loss_sum: torch.Tensor
    stat_sums: torch.Tensor  # [len(STAT_NAMES)]
    grad_logits: Optional[torch.Tensor]  # d loss_sum / d logits, fp32


def _shaped_chunk(logits: torch.Tensor, targets: torch.Tensor, shaping: RewardShaping, with_grad: bool) -> _ChunkResult:
    """Surrogate, diagnostics and (optionally) the analytic gradient for rows that all count.

    `logits` is fp32 [n, V] and is overwritten (it becomes log p): at large vocabularies the
    chunk's [n, V] buffers are the memory cost of the loss, so only two are ever alive.
    No autograd happens here.
    """
    k = min(shaping.k, logits.shape[-1])
    log_p = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    p = log_p.exp()
    log_p_y = log_p.gather(1, targets[:, None]).squeeze(1)
    p_y = log_p_y.exp()
    w_y = positive_weight(log_p_y, shaping)

    top_idx = log_p.topk(k, dim=-1, sorted=False).indices
    log_p_top = log_p.gather(1, top_idx)
    p_top = log_p_top.exp()
    y_in_top = (top_idx == targets[:, None]).any(dim=-1)
    accuracy = (log_p.argmax(-1) == targets).float()

    # sum_a p_a log p_a over all tokens, over the top-k, and the ground truth's own term,
    # so the negatives' sums follow without building a [n, V] weight tensor. (A row-wise
    # dot product: p * log_p would be one more [n, V] buffer.)
    plogp_all = (p.unsqueeze(1) @ log_p.unsqueeze(2)).view(-1)
    plogp_top = (p_top * log_p_top).sum(-1)
    plogp_y = p_y * log_p_y
    mass_top = p_top.sum(-1)
    zero = torch.zeros_like(p_y)
    neg_top_plogp = plogp_top - torch.where(y_in_top, plogp_y, zero)
    neg_tail_plogp = plogp_all - plogp_top - torch.where(y_in_top, zero, plogp_y)
    neg_top_mass = mass_top - torch.where(y_in_top, p_y, zero)
    neg_tail_mass = (1.0 - mass_top) - torch.where(y_in_top, zero, p_y)

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
        if shaping.lambda_top != shaping.lambda_tail:
            grad.scatter_add_(1, top_idx, -(shaping.lambda_top - shaping.lambda_tail) * p_top)
        grad.scatter_(1, targets[:, None], (p_y * total_w - w_y)[:, None])
    return _ChunkResult(loss.sum(), stat_sums, grad)


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
        p = lp.exp()
        top_idx = z.topk(min(shaping.k, vocab), dim=-1).indices
        reward = torch.full_like(p, shaping.lambda_tail).scatter_(1, top_idx, shaping.lambda_top)
        weights = p * reward
        weights.scatter_(1, targets[:, None], positive_weight(lp.gather(1, targets[:, None]), shaping))
        stats = _shaped_chunk(z.detach().clone(), targets, shaping, with_grad=False).stat_sums
    loss_sum = -(weights * log_p).sum()
    loss, stats = _finish(loss_sum, stats, rows.numel())
    return LossOutput(loss, stats)


class _ShapedLossFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, shaping, chunk_size, ignore_index):  # type: ignore[override]
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)
        rows, targets = _flatten(labels, ignore_index)
        grad = torch.zeros_like(flat) if ctx.needs_input_grad[0] else None
        loss_sum = flat.new_zeros((), dtype=torch.float32)
        stat_sums = flat.new_zeros(len(STAT_NAMES), dtype=torch.float32)
        for start in range(0, rows.numel(), chunk_size):
            chunk_rows = rows[start : start + chunk_size]
            out = _shaped_chunk(flat[chunk_rows].float(), targets[start : start + chunk_size], shaping, grad is not None)
            loss_sum += out.loss_sum
            stat_sums += out.stat_sums
            if grad is not None:
                grad.index_copy_(0, chunk_rows, out.grad_logits.to(grad.dtype))
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
        return (grad * grad_loss.to(grad.dtype)).view(ctx.logits_shape), None, None, None, None


def shaped_ntp_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    shaping: RewardShaping,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> LossOutput:
    """The shaped loss over given logits, in fp32 chunks of `chunk_size` tokens."""
    loss, stat_sums = _ShapedLossFromLogits.apply(logits, labels, shaping, chunk_size, ignore_index)
    _, stats = _finish(loss, stat_sums, int((labels != ignore_index).sum()))
    return LossOutput(loss, stats)


class _FusedLinearShapedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, shaping, chunk_size, ignore_index):  # type: ignore[override]
        device_type = hidden.device.type
        # Under autocast the LM head runs in the autocast dtype, as it would inside the
        # model; autocast is then switched off so every matmul below has explicit dtypes.
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        flat = hidden.reshape(-1, hidden.shape[-1])
        rows, targets = _flatten(labels, ignore_index)
        num_tokens = rows.numel()
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(flat) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        loss_sum = flat.new_zeros((), dtype=torch.float32)
        stat_sums = flat.new_zeros(len(STAT_NAMES), dtype=torch.float32)
        w = weight.to(compute_dtype)
        with torch.autocast(device_type, enabled=False):
            for start in range(0, num_tokens, chunk_size):
                chunk_rows = rows[start : start + chunk_size]
                h = flat[chunk_rows].to(compute_dtype)
                logits = (h @ w.t()).float()
                out = _shaped_chunk(logits, targets[start : start + chunk_size], shaping, need_h or need_w)
                del logits
                loss_sum += out.loss_sum
                stat_sums += out.stat_sums
                if out.grad_logits is not None:
                    g = out.grad_logits.to(compute_dtype)
                    if need_h:
                        grad_hidden.index_copy_(0, chunk_rows, (g @ w).to(grad_hidden.dtype))
                    if need_w:
                        grad_weight += (g.t() @ h).float()
        scale = 1.0 / max(num_tokens, 1)
        if need_h:
            grad_hidden.mul_(scale)
        if need_w:
            grad_weight = grad_weight.mul_(scale).to(weight.dtype)
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
        return grad_hidden, grad_weight, None, None, None, None


def shaped_ntp_loss_fused(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shaping: RewardShaping,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> LossOutput:
    """The shaped loss of `hidden @ weight.T` (an LM head without bias), chunk by chunk."""
    loss, stat_sums = _FusedLinearShapedLoss.apply(hidden, weight, labels, shaping, chunk_size, ignore_index)
    _, stats = _finish(loss, stat_sums, int((labels != ignore_index).sum()))
    return LossOutput(loss, stats)
