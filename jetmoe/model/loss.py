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
