"""Expert weights and the local token dispatcher.

A sparse layer computes its experts in three steps: `dispatch` gathers the token rows of every local
expert into one contiguous block per expert, `GroupedExperts` multiplies every block by its expert's
weight in a single grouped matmul, and `combine` puts the results back in token/slot order. An
expert-parallel dispatcher (jetmoe.parallel) replaces `LocalDispatcher` with one that moves rows
between ranks; the layer code stays the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from jetmoe.model.grouped_mm import GroupSizes, grouped_linear, grouped_mm_path  # noqa: F401 (re-exported)
from jetmoe.model.router import expert_counts

class _GatherRows(torch.autograd.Function):
    """out = x[index] where index is a permutation of the k slots of every row (k = 1: a plain permutation).

    The backward gathers with the inverse permutation and sums each row's k slot gradients as a [T, k, D]
    reduction: no index_add over duplicated rows, so no atomics on CUDA and bitwise-reproducible gradients."""

    @staticmethod
    def forward(ctx, x, index, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad.index_select(0, inverse)
        if ctx.k > 1:
            grad = grad.view(-1, ctx.k, grad.shape[-1]).sum(1)
        return grad, None, None, None


def permute_rows(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[order] for a permutation `order` whose inverse is `inverse`; the backward is a gather too."""
    return _GatherRows.apply(x, order, inverse, 1)


def gather_slots(x: torch.Tensor, slot_order: torch.Tensor, slot_inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """Rows of the T*k slots in `slot_order`: x is [T, D] (a token's row serves its k slots) or [T, k, D]."""
    if x.dim() == 2:
        return _GatherRows.apply(x, slot_order // top_k, slot_inverse, top_k)
    return permute_rows(x.reshape(-1, x.shape[-1]), slot_order, slot_inverse)


class GroupedExperts(nn.Module):
    """One linear map per expert, stored as weight [num_experts, out_features, in_features]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    @property
    def num_experts(self) -> int:
        # E, or E / ep once jetmoe.parallel keeps only this rank's slice.
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor | GroupSizes) -> torch.Tensor:
        return grouped_linear(x, self.weight, tokens_per_expert)

    def extra_repr(self) -> str:
        e, out, inp = self.weight.shape
        return f"experts={e}, in={inp}, out={out}"


@dataclass
class LocalPlan:
    order: torch.Tensor  # [T*k] flat slot indices (token * k + slot), sorted by expert
    inverse: torch.Tensor  # [T*k] position of each flat slot inside `order`
    tokens_per_local_expert: torch.Tensor  # LongTensor[E]
    num_tokens: int
    top_k: int

    def __post_init__(self):
        self.group_sizes = GroupSizes(self.tokens_per_local_expert)


class LocalDispatcher:
    """All experts live in this process: dispatch is a sort by expert, combine the inverse permutation."""

    def plan(self, expert_ids: torch.Tensor, num_experts: int) -> LocalPlan:
        num_tokens, top_k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = flat.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return LocalPlan(order, inverse, expert_counts(expert_ids, num_experts), num_tokens, top_k)

    def dispatch(self, x: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        """x [T, D] (one row per token, shared by its k slots) or [T, k, D] -> rows grouped by expert."""
        return gather_slots(x, plan.order, plan.inverse, plan.top_k)

    def combine(self, y: torch.Tensor, plan: LocalPlan) -> torch.Tensor:
        return permute_rows(y, plan.inverse, plan.order).view(plan.num_tokens, plan.top_k, y.shape[-1])
