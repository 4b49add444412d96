"""Activation recompute, applied to blocks from outside the model (the one implementation).

A block so wrapped keeps only its inputs in forward and runs again in backward. `JetMoEConfig.
gradient_checkpointing` and `parallel.activation_checkpointing` both map to this.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _recomputed(forward, *args):
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward. The block's forward is wrapped in place, so
    parameter names (and with them checkpoints and the pipeline's name map) stay as they are."""
    for block in blocks:
        if getattr(block.forward, "_recomputed", False):
            continue
        wrapped = functools.partial(_recomputed, block.forward)
        wrapped._recomputed = True
        block.forward = wrapped
