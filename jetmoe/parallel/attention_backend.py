"""Which SDPA kernel the blocks' causal attention runs on a GPU: chosen once, in an explicit order, and logged.

Measured by bench/gpu.py on an H200 (torch 2.11, JetMoE-8B shapes: 32 query heads over 16 kv heads of 128, 4096
tokens, forward + backward): cuDNN 1.18 ms, FlashAttention-2 2.11 ms, memory-efficient refused (grouped kv heads),
math 28 ms. Hopper and newer try cuDNN first; Ampere FlashAttention-2 (its measured home). The order is set rather
than left to torch's default so that a release changing it cannot silently change the kernel. Document masks go
to FlexAttention (jetmoe.model.masking); a dense mask falls through to the kernels that take one.
"""

from __future__ import annotations

import contextlib

HOPPER_FIRST = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
AMPERE_FIRST = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def sdpa_order(capability: tuple[int, int]) -> tuple[str, ...]:
    """The SDPA backends, fastest first, for a CUDA device of this (major, minor)."""
    return HOPPER_FIRST if capability[0] >= 9 else AMPERE_FIRST


def sdpa_priority(capability: tuple[int, int]) -> contextlib.AbstractContextManager:
    """A context in which SDPA tries the backends in `sdpa_order` (all stay allowed, as fallbacks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in sdpa_order(capability)], set_priority=True)


def describe(capability: tuple[int, int]) -> str:
    names = {"CUDNN_ATTENTION": "cuDNN", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
             "MATH": "math"}
    return "attention: SDPA " + " > ".join(names[n] for n in sdpa_order(capability))
