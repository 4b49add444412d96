"""The training objective, defined once: the model, the last pipeline stage and the metrics row all use it.

    loss = lm_loss + aux_loss,   aux_loss = aux_loss_coef * balance_loss + z_loss_coef * z_loss

with balance_loss and z_loss summed over every router (JetMoE paper, section 2.4; jetmoe/model/router.py).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.nn import functional as F

from jetmoe.model.router import RouterLoss


def causal_lm_loss(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the positions whose label is not -100; labels already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=-100)


# Tokens per chunk of the chunked head: [chunk, vocab] fp32 logits at a time (1024 x 32000: 131 MB).
HEAD_CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """causal_lm_loss(hidden @ weight.T, labels), computed chunk by chunk of tokens. When a gradient is wanted,
    forward also turns each chunk's fp32 logits into the loss's gradient with respect to them, softmax - onehot
    (masked), and keeps it, so backward only scales it and multiplies it back (two matmuls, as for full logits)
    instead of computing the logits again: a quarter less head work, for [tokens, vocab] fp32 kept on the last
    stage (524 MB for 4096 tokens of a 32k vocabulary). Each chunk's logits are the same matmul in the same dtype,
    cast to fp32, as the full version's, so the loss and gradients agree to rounding."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk):
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        total = hidden.new_zeros((), dtype=torch.float32)
        safe = labels.clamp(min=0)
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        softmax_minus_onehot = hidden.new_empty(labels.shape[0], weight.shape[0], dtype=torch.float32) if keep else None
        for s in range(0, hidden.shape[0], chunk):
            logits = F.linear(hidden[s:s + chunk], weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            y = safe[s:s + chunk]
            picked = logits.gather(1, y[:, None]).squeeze(1)
            total += ((lse - picked) * valid[s:s + chunk]).sum()
            if keep:
                g = softmax_minus_onehot[s:s + chunk]
                torch.exp(logits.sub_(lse[:, None]), out=g)
                g[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                g *= valid[s:s + chunk].unsqueeze(1)
        ctx.save_for_backward(hidden, weight, softmax_minus_onehot, count)
        return total / count

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, softmax_minus_onehot, count = ctx.saved_tensors
        g = (softmax_minus_onehot * (grad.float() / count)).to(hidden.dtype)
        grad_hidden = g @ weight if ctx.needs_input_grad[0] else None
        grad_weight = (g.T @ hidden).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def linear_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, shifted_labels: torch.Tensor,
                          chunk_tokens: int = HEAD_CHUNK_TOKENS) -> torch.Tensor:
    """causal_lm_loss(F.linear(hidden, weight), shifted_labels) without fp32 logits: the head and the loss in
    chunks of `chunk_tokens` tokens, the gradient with respect to the logits kept in the working dtype."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    return _LinearCrossEntropy.apply(hidden, weight, shifted_labels.reshape(-1), chunk_tokens)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers' convention: position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def aux_loss(balance_loss, z_loss, aux_loss_coef: float, z_loss_coef: float):
    """The router part of the objective; works on tensors and on plain floats (the metrics row)."""
    return aux_loss_coef * balance_loss + z_loss_coef * z_loss


def sum_router_losses(losses: Iterable[RouterLoss]) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance_loss, z_loss): each summed over the given routers; zeros when there are none."""
    losses = list(losses)
    if not losses:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack([l.balance for l in losses]).sum(), torch.stack([l.z for l in losses]).sum()


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, aux, grad_scale):
        ctx.grad_scale = grad_scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        shape, dtype, device = ctx.aux_meta
        return grad_hidden, torch.full(shape, ctx.grad_scale, dtype=dtype, device=device), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """Identity on `hidden`; in backward, `aux` receives gradient `grad_scale` as if `grad_scale * aux` had
    been added to the loss. Lets a pipeline stage train its router losses while sending only hidden states."""
    return _AttachAuxLoss.apply(hidden, aux, grad_scale)
