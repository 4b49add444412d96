"""Mixture of attention heads (MoA): each of the top-k query slots of a token uses its expert's own query
and output projections; keys and values come from one shared projection and serve every slot."""

from __future__ import annotations

import torch
from torch import nn

from jetmoe.model.experts import GroupedExperts
from jetmoe.model.layers import apply_rotary
from jetmoe.model.masking import attend
from jetmoe.model.moe import SparseLayer, weighted_sum_over_slots
from jetmoe.model.router import RouterLoss, TopKRouter


class AttentionExperts(nn.Module):
    """Parameter container, so the names match transformers' `self_attention.experts.*`."""

    def __init__(self, hidden_size: int, proj_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.input_linear = GroupedExperts(num_experts, hidden_size, proj_size)  # queries
        self.output_linear = GroupedExperts(num_experts, proj_size, hidden_size)  # outputs
        self.router = TopKRouter(hidden_size, num_experts, top_k)


class MoA(SparseLayer):
    def __init__(self, hidden_size: int, num_kv_heads: int, head_dim: int, num_experts: int, top_k: int,
                 dropout: float = 0.0):
        super().__init__()
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.experts = AttentionExperts(hidden_size, num_kv_heads * head_dim, num_experts, top_k)
        self.kv_proj = nn.Linear(hidden_size, 2 * num_kv_heads * head_dim, bias=False)
        self._init_sparse(num_experts, top_k)

    # The sparse-layer interface, aliased onto the transformers-named container.
    router = property(lambda self: self.experts.router)
    input_linear = property(lambda self: self.experts.input_linear)
    output_linear = property(lambda self: self.experts.output_linear)
    bias = property(lambda self: self.experts.bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask=None) -> tuple[torch.Tensor, RouterLoss]:
        """rope: the rotary (cos, sin) of x's positions; mask: see jetmoe.model.masking (None: causal)."""
        b, t, d = x.shape
        h, hd, k = self.num_kv_heads, self.head_dim, self.top_k
        flat = x.reshape(b * t, d)
        expert_ids, gates, loss = self.router(flat)
        plan = self.dispatcher.plan(expert_ids, self.num_experts)

        q = self.input_linear(self.dispatcher.dispatch(flat, plan), plan.group_sizes)
        q = self.dispatcher.combine(q, plan)  # [b*t, k, h*hd]
        # Query head (kv head i, slot j) sits at i*k + j, so SDPA's grouped-query mode pairs it with
        # kv head i: the same pairing as transformers' tiling of the kv heads over the k slots.
        q = q.view(b, t, k, h, hd).permute(0, 3, 2, 1, 4).reshape(b, h * k, t, hd)
        key, value = self.kv_proj(x).view(b, t, 2, h, hd).permute(2, 0, 3, 1, 4)
        q, key = apply_rotary(q, *rope), apply_rotary(key, *rope)

        attn = attend(q, key, value, mask, dropout_p=self.dropout if self.training else 0.0, enable_gqa=k > 1)
        attn = attn.view(b, h, k, t, hd).permute(0, 3, 2, 1, 4).reshape(b * t * k, h * hd)

        y = self.output_linear(self.dispatcher.dispatch(attn.view(b * t, k, h * hd), plan),
                               plan.group_sizes)
        y = weighted_sum_over_slots(self.dispatcher.combine(y, plan), gates)
        return (y + self.bias).view(b, t, d), loss
