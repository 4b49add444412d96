"""Rows grouped by expert times their expert's weight: one grouped matmul (torch._grouped_mm) where the device
runs it without a host sync, a per-expert loop elsewhere.

With a weight that carries `main_grad` (an fp32 tensor of its shape, attached by the training engine), the
backward adds the weight's gradient straight into it inside the matmul (cuBLAS's C += A @ B with fp32 C), as
Megatron's gradient-accumulation fusion does for its linear layers: no bf16 weight gradient is written, and no
separate pass adds it into the fp32 sum. The weight's `.grad` then stays None.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

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
    """Rows of x [M, in], grouped by expert, times their expert's weight [E, out, in] -> [M, out]. A weight with
    a `main_grad` gets its gradient added into that instead of into `.grad` (see the module docstring)."""
    sizes = tokens_per_expert if isinstance(tokens_per_expert, GroupSizes) else GroupSizes(tokens_per_expert)
    main_grad = getattr(weight, "main_grad", None)
    if main_grad is not None and torch.is_grad_enabled() and weight.requires_grad:
        return grouped_mm_into_main_grad(x, weight, sizes.counts, main_grad)
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


def _rows_times_weight(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x [M, in] times weight[e].T, group by group: the grouped kernel where it serves, else a per-expert loop."""
    if _grouped_mm_supported(x, weight):
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=_offsets(counts))
    chunks = x.split(counts.tolist(), dim=0)
    return torch.cat([F.linear(chunk, w) for chunk, w in zip(chunks, weight)], dim=0)


def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether torch.addmm takes bf16 operands with an fp32 C and out (its out_dtype overload: CUDA, torch >= 2.10;
    earlier releases require C in the operands' dtype)."""
    if device.type != "cuda":
        return False
    if device not in _FP32_OUT_ADDMM:
        acc = torch.zeros(16, 16, device=device)
        a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
        try:
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _FP32_OUT_ADDMM[device] = bool((acc == 16).all())
        except (RuntimeError, TypeError):
            _FP32_OUT_ADDMM[device] = False
    return _FP32_OUT_ADDMM[device]


_FP32_OUT_ADDMM: dict[torch.device, bool] = {}


def add_product_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in fp32 and a, b in their own dtype, the sum taken in fp32 (never rounded to a's dtype)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _fp32_out_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)  # cuBLAS reads and writes C once, in its epilogue
    else:  # CPU, or an older torch: the same fp32 sum through fp32 copies of the operands
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


@torch.library.custom_op("jetmoe::grouped_mm_into_main_grad", mutates_args=())
def grouped_mm_into_main_grad(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor,
                              main_grad: torch.Tensor) -> torch.Tensor:
    """x [M, in] times weight[e].T -> [M, out], as `grouped_mm`; its backward adds the weight gradient into
    main_grad [E, out, in] (fp32) and gives the weight none."""
    return _rows_times_weight(x, weight, counts)


@grouped_mm_into_main_grad.register_fake
def _(x, weight, counts, main_grad):
    return x.new_empty(x.shape[0], weight.shape[1])


@torch.library.custom_op("jetmoe::grouped_mm_backward_into_main_grad", mutates_args=("main_grad",))
def grouped_mm_backward_into_main_grad(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                       counts: torch.Tensor, main_grad: torch.Tensor) -> torch.Tensor:
    """main_grad[e] += grad_e.T @ x_e for each expert's rows (one count fetch, one fused GEMM per expert); returns
    the gradient of x, grad [M, out] times weight[e] group by group, as the forward ran."""
    sizes = counts.tolist()
    start = 0
    for e, rows in enumerate(sizes):
        if rows:
            add_product_(main_grad[e], grad[start:start + rows].t(), x[start:start + rows])
        start += rows
    if _grouped_mm_supported(x, weight):
        return torch._grouped_mm(grad, weight, offs=_offsets(counts))
    return torch.cat([chunk @ w for chunk, w in zip(grad.split(sizes, dim=0), weight)], dim=0)


@grouped_mm_backward_into_main_grad.register_fake
def _(grad, x, weight, counts, main_grad):
    return torch.empty_like(x)


def _setup_into_main_grad(ctx, inputs, output):
    x, weight, counts, main_grad = inputs
    ctx.save_for_backward(x, weight, counts)
    # Not saved for backward: every micro-batch's backward adds into it, which would fail autograd's check that a
    # saved tensor is unchanged for the micro-batches whose forward ran before (1F1B runs several in flight).
    ctx.main_grad = main_grad


def _backward_into_main_grad(ctx, grad):
    x, weight, counts = ctx.saved_tensors
    return grouped_mm_backward_into_main_grad(grad.contiguous(), x, weight, counts, ctx.main_grad), None, None, None


grouped_mm_into_main_grad.register_autograd(_backward_into_main_grad, setup_context=_setup_into_main_grad)
