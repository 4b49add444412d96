"""Small building blocks: RMSNorm, rotary position embedding, the SwiGLU activation."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 and scaled in the input dtype (as transformers does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def default_position_ids(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(seq_len, device=device).expand(batch, seq_len)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, 1, T, head_dim] (the half-split layout: frequencies repeated twice)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    # [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (sign=1), or the inverse rotation (sign=-1), in 3 passes
    # and without the concatenated copy that rotate_half builds.
    half = x.shape[-1] // 2
    s = sin[..., :half]  # both halves of sin (and cos) hold the same angles
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], s, value=-sign)
    out[..., half:].addcmul_(x[..., :half], s, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, -1.0), None, None  # a rotation's transpose is its inverse


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by the angles; the two halves of head_dim form the complex pairs
    (transformers' rotate_half layout). cos and sin carry no gradient."""
    return _Rotary.apply(x, cos.detach(), sin.detach())


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b for h = [a | b]; keeps only h for backward and writes both halves of its gradient in place
    (autograd's version would also keep silu(a) and concatenate the two gradient halves)."""

    @staticmethod
    def forward(ctx, h):
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return torch.nn.functional.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_a, grad_b = grad_h.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        torch.mul(torch.nn.functional.silu(a), grad, out=grad_b)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half, along the last dim."""
    if torch.compiler.is_compiling():  # Inductor fuses it and chooses what to keep for backward
        a, b = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(a) * b
    return _SwiGLU.apply(h)
