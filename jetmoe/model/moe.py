"""Sparse layers: the shared base (router + experts + dispatcher) and the MoE feed-forward layer."""

from __future__ import annotations

import torch
from torch import nn

from jetmoe.model.experts import GroupedExperts, LocalDispatcher
from jetmoe.model.layers import swiglu
from jetmoe.model.router import RouterLoss, TopKRouter


class SparseLayer(nn.Module):
    """A layer whose tokens pick top-k of `num_experts` experts.

    Exposes `router`, `input_linear`, `output_linear`, `bias` and a settable `dispatcher` (how tokens reach
    the experts: `parallel/` swaps in an expert-parallel one). `forward` returns (output, RouterLoss of this
    call); the layer keeps no per-call state.
    """

    num_experts: int  # global count (config.num_local_experts); the weights may hold a slice of them
    top_k: int

    def _init_sparse(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.dispatcher = LocalDispatcher()


class _WeightedSum(torch.autograd.Function):
    """sum_j gates[t, j] * y[t, j, :] in fp32; y is kept for backward in its own dtype, not as an fp32 copy."""

    @staticmethod
    def forward(ctx, y, gates):
        ctx.save_for_backward(y, gates)
        return torch.bmm(gates.float().unsqueeze(1), y.float()).squeeze(1).to(y.dtype)

    @staticmethod
    def backward(ctx, grad):
        y, gates = ctx.saved_tensors
        grad = grad.float()
        grad_y = (gates.float().unsqueeze(-1) * grad.unsqueeze(1)).to(y.dtype)  # [T, k, D]
        grad_gates = torch.bmm(y.float(), grad.unsqueeze(-1)).squeeze(-1).to(gates.dtype)  # [T, k]
        return grad_y, grad_gates


def weighted_sum_over_slots(y: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum_j gates[t, j] * y[t, j, :] for y [T, k, D], gates [T, k]: in fp32, returned in y's dtype."""
    return _WeightedSum.apply(y, gates)


class MoE(SparseLayer):
    """Mixture of gated-SiLU MLP experts: expert e maps x to W2_e (silu(W1a_e x) * W1b_e x); plus a shared bias."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.input_linear = GroupedExperts(num_experts, hidden_size, 2 * intermediate_size)
        self.output_linear = GroupedExperts(num_experts, intermediate_size, hidden_size)
        self.router = TopKRouter(hidden_size, num_experts, top_k)
        self._init_sparse(num_experts, top_k)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLoss]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert_ids, gates, loss = self.router(x)
        plan = self.dispatcher.plan(expert_ids, self.num_experts)
        h = self.input_linear(self.dispatcher.dispatch(x, plan), plan.group_sizes)
        h = self.output_linear(swiglu(h), plan.group_sizes)
        y = weighted_sum_over_slots(self.dispatcher.combine(h, plan), gates)
        return (y + self.bias).view(shape), loss
