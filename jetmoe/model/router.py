"""Top-k router and the JetMoE paper's router losses (section 2.4: load balancing and z-loss)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class RouterLoss(NamedTuple):
    """One router's losses on one micro-batch: balance, z and mean_prob carry gradient; the counts are detached."""

    balance: torch.Tensor  # 0-dim, E * sum_i f_i * P_i
    z: torch.Tensor  # 0-dim, mean over tokens of logsumexp(logits)^2
    tokens_per_expert: torch.Tensor  # LongTensor[E], assignments per expert (T * k in total)
    mean_prob: torch.Tensor  # [E], P_i: mean softmax probability per expert (carries gradient); balance = E f . P


class Routing(NamedTuple):
    expert_ids: torch.Tensor  # [T, k], best first
    gates: torch.Tensor  # [T, k], softmax over the k chosen logits, fp32
    loss: RouterLoss


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert, without a device-to-host sync (unlike bincount on CUDA)."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))


def router_loss(logits: torch.Tensor, expert_ids: torch.Tensor) -> RouterLoss:
    """Paper losses from fp32 logits [T, E] and the chosen experts [T, k]."""
    num_tokens, num_experts = logits.shape
    counts = expert_counts(expert_ids, num_experts)
    share = counts.float() / expert_ids.numel()  # f_i: share of the T*k assignments
    mean_prob = torch.softmax(logits, dim=-1).mean(0)  # P_i
    balance = num_experts * (share * mean_prob).sum()
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return RouterLoss(balance, z, counts, mean_prob)


class _Fp32Linear(torch.autograd.Function):
    """x @ w.T computed in fp32, keeping x and w for backward in their own dtype (x is saved by the experts'
    dispatch anyway, so an fp32 copy would be extra activation memory)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.float()
        return (grad @ weight.float()).to(x.dtype), (grad.T @ x.float()).to(weight.dtype)


def choose_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The k highest-scoring experts of each token [T, k], best first. A choice, not differentiated: the
    gates take their gradient through a gather of the logits."""
    return logits.detach().topk(top_k, dim=-1).indices


class TopKRouter(nn.Module):
    """Linear scores -> top-k experts; gates are the softmax over the k chosen logits.

    Everything here runs in fp32 whatever the input dtype (Megatron's router recommendation): the logits'
    matmul too, since bf16 logits flip near-tied top-k choices and blur the z-loss.

    `choose(logits, top_k) -> expert_ids` is a seam (like a sparse layer's dispatcher): activation recompute
    (jetmoe.parallel.activation_checkpoint) replays the forward's choice there instead of choosing again."""

    def __init__(self, dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.layer = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.choose = choose_top_k

    def forward(self, x: torch.Tensor) -> Routing:
        logits = _Fp32Linear.apply(x, self.layer.weight)
        expert_ids = self.choose(logits, self.top_k)
        # The chosen logits through a one-hot product, not a gather: a gather's backward is a scatter-add,
        # which has no deterministic CUDA kernel (and F.one_hot would sync on its range check).
        chosen = (expert_ids.unsqueeze(-1) == torch.arange(self.num_experts, device=logits.device)).to(logits.dtype)
        gates = torch.softmax(torch.einsum("te,tke->tk", logits, chosen), dim=-1)
        return Routing(expert_ids, gates, router_loss(logits, expert_ids))
