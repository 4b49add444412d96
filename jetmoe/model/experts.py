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
from torch.nn import functional as F

from jetmoe.model.router import expert_counts

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# CUDA majors where torch._grouped_mm runs one CUTLASS kernel with the group offsets read on the device: bf16 on
# sm90 and sm100 (torch 2.8 / 2.9 to 2.11 at least). Elsewhere torch (>= 2.9) still accepts any SM >= 80 but runs
# a per-group loop that copies the offsets to the host on every call (three syncs per projection per forward
# and backward); our own loop syncs once per layer, so it serves there. bench/gpu.py's grouped_gemm section
# checks on the device whether a call syncs.
FUSED_GROUPED_MM_MAJORS = (9, 10)


def grouped_mm_path(device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None = None) -> str:
    """"grouped" (one torch._grouped_mm, no host sync) or "loop" (per-expert matmuls, one count fetch per layer)
    for rows of `dtype` on a `device_type` device (`capability`: the CUDA device's (major, minor))."""
    if not _HAS_GROUPED_MM or dtype not in _GROUPED_MM_DTYPES:
        return "loop"
    if device_type == "cuda":
        fused = dtype == torch.bfloat16 and capability is not None and capability[0] in FUSED_GROUPED_MM_MAJORS
        return "grouped" if fused else "loop"
    return "grouped" if device_type == "cpu" else "loop"


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.dtype != weight.dtype:
        return False
    # The kernel wants 16-byte aligned row strides on both operands.
    align = 16 // x.element_size()
    if x.shape[-1] % align or weight.shape[1] % align:
        return False
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    return grouped_mm_path(x.device.type, x.dtype, capability) == "grouped"


class GroupSizes:
    """Rows per expert: the device tensor the grouped matmul reads, and its host copy, fetched at most once
    (only the per-expert loop fallback needs it; one fetch per layer, not one per projection)."""

    def __init__(self, counts: torch.Tensor, host: list[int] | None = None):
        self.counts = counts
        self._host = host

    def host(self) -> list[int]:
        if self._host is None:
            self._host = self.counts.tolist()
        return self._host


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor | GroupSizes) -> torch.Tensor:
    """Rows of x [M, in], grouped by expert, times their expert's weight [E, out, in] -> [M, out]."""
    sizes = tokens_per_expert if isinstance(tokens_per_expert, GroupSizes) else GroupSizes(tokens_per_expert)
    if _grouped_mm_supported(x, weight):
        return grouped_mm(x, weight, sizes.counts)
    chunks = x.split(sizes.host(), dim=0)
    return torch.cat([F.linear(chunk, w) for chunk, w in zip(chunks, weight)], dim=0)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return counts.cumsum(0).to(torch.int32)


# torch._grouped_mm behind our own operator, so torch.compile can trace a block without a graph break: its
# shapes depend on no routing (M rows in, M rows out), and torch 2.13's fake kernel of _grouped_mm accepts
# only bf16, while this one serves fp32 too. Inductor calls the operator as it is.
@torch.library.custom_op("jetmoe::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, in] (rows grouped by expert, counts[e] rows for expert e) times weight[e].T -> [M, out]."""
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=_offsets(counts))


@grouped_mm.register_fake
def _(x, weight, counts):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("jetmoe::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    offs = _offsets(counts)
    grad_x = torch._grouped_mm(grad, weight, offs=offs)  # [M, out] x [E, out, in] -> [M, in]
    grad_weight = torch._grouped_mm(grad.t(), x, offs=offs)  # [out, M] x [M, in] -> [E, out, in]
    return grad_x, grad_weight


@_grouped_mm_backward.register_fake
def _(grad, x, weight, counts):
    return torch.empty_like(x), torch.empty_like(weight)


def _setup(ctx, inputs, output):
    x, weight, counts = inputs
    ctx.save_for_backward(x, weight, counts)


def _backward(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    grad_x, grad_weight = _grouped_mm_backward(grad.contiguous(), x, weight, counts)
    return grad_x, grad_weight, None


grouped_mm.register_autograd(_backward, setup_context=_setup)


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
