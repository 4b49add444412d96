"""train.deterministic=true: bitwise-reproducible steps on one layout (same seed, same devices, same data).

The model's own kernels are already free of atomics (each token's k slot gradients are summed as a
[T, k, D] reduction, jetmoe.model.experts.gather_slots); this turns on torch's deterministic algorithms for
the rest (an op without a deterministic implementation then raises instead of silently varying), fixes
cuBLAS's workspace (its split-K reductions otherwise vary with the workspace) and stops cuDNN autotuning."""

from __future__ import annotations

import os

import torch


def set_deterministic(enabled: bool = True) -> None:
    """Call once before the model and the engine are built (cuBLAS reads its workspace setting at start-up)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def deterministic_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled()
