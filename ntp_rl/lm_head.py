"""The LM head, a chunk of rows at a time: where hidden states become token probabilities.

At the paper's vocabulary (151,936) one fp32 row of logits is 0.6 MB, so a [tokens x vocab]
tensor is 0.6 GB per 1K tokens and a full log-softmax several times that. No pass builds
one: pre-training's shaped loss (`losses.shaped_ntp_loss_fused`) and RL's per-token
log-probs and entropy (`token_logprobs_fused`) both hand the rows that need a probability
to `ChunkedHead`, which runs `rows @ W.T` a chunk at a time and sends each chunk's gradient
straight into the hidden rows and the weight.

The two differ in when the gradient is known. The shaped loss knows it in the forward pass
and forms it there. A log-prob's gradient depends on what the RL loss does with it, which is
known only in backward, so `token_logprobs_fused` keeps the hidden rows and one logsumexp
per row and recomputes each chunk's logits in backward: memory is one chunk either way.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn


def has_plain_linear_head(lm: nn.Module) -> bool:
    """Whether the model's logits are exactly `last_hidden_state @ W.T`, so the head can be chunked.

    A bias, a logit soft-cap or a logit scale change the logits after the head; such models
    take the materialised path instead.
    """
    head = lm.get_output_embeddings()
    config = lm.config
    return (
        isinstance(head, nn.Linear)
        and head.bias is None
        and not getattr(config, "final_logit_softcapping", None)
        and getattr(config, "logit_scale", None) in (None, 1.0)
    )


def head_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the model's own head would compute in: the autocast dtype under autocast."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class ChunkedHead:
    """`hidden[rows] @ weight.T` a chunk of rows at a time, and the chunks' gradients summed back.

    `hidden` is [N, H]; `rows` (an index tensor) picks the rows that get logits, all of them
    when None. The matmuls run with autocast off and in `dtype` explicitly (the caller switches
    autocast off around the loop), so forward and a recomputing backward give the same logits.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, chunk_size: int,
                 rows: Optional[torch.Tensor] = None, need_hidden: bool = False, need_weight: bool = False):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        self.hidden, self.rows, self.dtype, self.chunk_size = hidden, rows, dtype, chunk_size
        self.w = weight.to(dtype)
        self.num_rows = hidden.shape[0] if rows is None else rows.numel()
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # The weight's gradient is summed in the weight's dtype: in place by addmm_ when the head
        # computes in that dtype, and by adding each chunk's product when autocast computes in
        # bf16 for fp32 weights. An fp32 copy of a [V, H] product never exists.
        self.grad_weight = torch.zeros_like(weight) if need_weight else None

    def chunks(self) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        """(position among the rows, the chunk's hidden rows, its logits in `dtype`), chunk by chunk."""
        for start in range(0, self.num_rows, self.chunk_size):
            part = slice(start, min(start + self.chunk_size, self.num_rows))
            h = (self.hidden[part] if self.rows is None else self.hidden[self.rows[part]]).to(self.dtype)
            yield part, h, h @ self.w.t()

    def backprop(self, part: slice, h: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """Add d(loss)/d(logits) of one chunk (in `dtype`) to the hidden rows' and the weight's gradients."""
        if self.grad_hidden is not None:
            grad_h = (grad_logits @ self.w).to(self.grad_hidden.dtype)
            if self.rows is None:
                self.grad_hidden[part] = grad_h
            else:
                self.grad_hidden.index_copy_(0, self.rows[part], grad_h)
        if self.grad_weight is not None and self.grad_weight.dtype == grad_logits.dtype:
            self.grad_weight.addmm_(grad_logits.t(), h)
        elif self.grad_weight is not None:
            self.grad_weight.add_(grad_logits.t() @ h)


@torch.no_grad()
def logits_in_chunks(lm: nn.Module, input_ids: torch.Tensor, chunk_size: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """The model's logits at every position of `input_ids` [B, L], flattened to rows, a chunk at a time.

    For measuring (no gradient); a head that is not a plain linear map gives slices of its full logits.
    """
    if not has_plain_linear_head(lm):
        logits = lm(input_ids=input_ids, use_cache=False).logits
        logits = logits.reshape(-1, logits.shape[-1])
        for start in range(0, logits.shape[0], chunk_size):
            yield slice(start, start + chunk_size), logits[start:start + chunk_size]
        return
    hidden = lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight = lm.get_output_embeddings().weight
    head = ChunkedHead(hidden, weight, head_dtype(hidden, weight), chunk_size)
    for part, _, logits in head.chunks():
        yield part, logits


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, with_entropy):  # type: ignore[override]
        dtype = head_dtype(hidden, weight)
        n = hidden.shape[0]
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n if with_entropy else 0, dtype=torch.float32)
        with torch.autocast(hidden.device.type, enabled=False):
            for part, _, logits in ChunkedHead(hidden, weight, dtype, chunk_size).chunks():
                z = logits.float().div_(temperature)
                row_lse = torch.logsumexp(z, dim=-1)
                logp[part] = z.gather(1, targets[part, None]).squeeze(1) - row_lse
                lse[part] = row_lse
                if with_entropy:
                    log_p = z.sub_(row_lse[:, None])
                    # A row-wise dot product: p * log_p would be one more [n, V] buffer.
                    entropy[part] = -(log_p.exp().unsqueeze(1) @ log_p.unsqueeze(2)).view(-1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.dtype, ctx.temperature, ctx.chunk_size = dtype, temperature, chunk_size
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):  # type: ignore[override]
        hidden, weight, targets, lse = ctx.saved_tensors
        head = ChunkedHead(hidden, weight, ctx.dtype, ctx.chunk_size, need_hidden=ctx.needs_input_grad[0],
                           need_weight=ctx.needs_input_grad[1])
        temperature = ctx.temperature
        with torch.autocast(hidden.device.type, enabled=False):
            for part, h, logits in head.chunks():
                # d logp_t / d z_t = (onehot(y_t) - softmax(z_t / T)) / T
                coef = grad_logp[part].float() / temperature
                grad = logits.float().div_(temperature).sub_(lse[part, None]).exp_().mul_(-coef[:, None])
                grad.scatter_add_(1, targets[part, None], coef[:, None])
                head.backprop(part, h, grad.to(ctx.dtype))
        return head.grad_hidden, head.grad_weight, None, None, None, None


def token_logprobs_fused(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                         chunk_size: int, with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """log softmax(hidden @ weight.T / temperature)[target] per row, in fp32, and the entropy (nats) of
    that distribution when asked for (no gradient), without a [rows x vocab] tensor.

    `hidden` [N, H] (the rows that need a log-prob), `weight` [V, H] (an LM head without bias),
    `targets` [N]. Gradients flow into `hidden` and `weight`.
    """
    logp, entropy = _TokenLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk_size), with_entropy)
    return logp, entropy if with_entropy else None
