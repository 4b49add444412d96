"""Causal attention over packed documents: which mask a forward uses, and the attention call that applies it.

A document starts wherever a position id is not the previous one plus one (packed data restarts at 0).
The model (or a pipeline stage) builds the mask once per forward (`attention_mask`) and hands it to every block;
its `document_mask` mode says whether to look for documents:
  "off"   plain causal attention (SDPA's flash/cuDNN kernels); no look at the position ids, no host sync;
  "on"    always a document mask, built on the device without a host sync;
  "auto"  (the default, for direct calls such as `model(ids, position_ids=...)`) a mask only when some row
          restarts, which costs one host sync per forward. Training sets "on" or "off" from data.document_mask.
The mask is a FlexAttention block mask where FlexAttention can run it (CUDA; it has no CPU backward), else a
dense [B, 1, T, T] boolean mask for SDPA.

Inside a compiled block (train.compile) `attend` calls FlexAttention plainly and Dynamo fuses it into the block's
graph; eager calls on CUDA go through one compiled FlexAttention made outside any graph. Nothing here changes
state while a graph is traced.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the dense mask serves
    create_block_mask = flex_attention = None

MODES = ("auto", "on", "off")
logger = get_logger(__name__)

# "auto": FlexAttention on CUDA; True also tries it on CPU (forward only: it has no CPU backward); False never.
use_flex: bool | str = "auto"
_flex_broken = False  # set (eagerly, never inside a graph) when this torch/triton cannot build the kernel


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] index of each token's document inside its row (0, 1, ...)."""
    starts = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return F.pad(starts.long().cumsum(-1), (1, 0))


def dense_document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T]: causal and inside one document."""
    doc = document_ids(position_ids)
    t = position_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


@dataclass
class FlexMask:
    """A FlexAttention BlockMask (all heads alike), with the position ids it came from (for the dense fallback)."""

    block: object
    position_ids: torch.Tensor


def flex_document_mask(position_ids: torch.Tensor) -> FlexMask:
    """Causal and inside one document, as a FlexAttention block mask (built on the device, no host sync)."""
    doc = document_ids(position_ids)

    def same_document_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    b, t = position_ids.shape
    return FlexMask(create_block_mask(same_document_causal, b, None, t, t, device=position_ids.device), position_ids)


def _flex_usable(device: torch.device, needs_grad: bool) -> bool:
    if flex_attention is None or _flex_broken or use_flex is False:
        return False
    if device.type == "cuda":
        return True
    return use_flex is True and device.type == "cpu" and not needs_grad


def attention_mask(position_ids: torch.Tensor | None, mode: str = "auto", needs_grad: bool | None = None):
    """None (plain causal), a dense boolean mask or a FlexAttention BlockMask for these position ids."""
    if mode not in MODES:
        raise JetMoEError(f"document_mask={mode!r} is unknown; use one of {', '.join(MODES)}")
    if position_ids is None or mode == "off":
        return None
    if mode == "auto" and not bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()):  # host sync
        return None
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled()
    if _flex_usable(position_ids.device, needs_grad):
        return flex_document_mask(position_ids)
    return dense_document_mask(position_ids)


@functools.cache
def _compiled_flex():
    """Eager FlexAttention on CUDA is an unfused reference: eager calls there go through this compiled one."""
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float = 0.0,
           enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, hd] over k, v [B, Hkv, T, hd] under `mask` (see attention_mask)."""
    global _flex_broken
    if isinstance(mask, FlexMask) and dropout_p == 0.0:  # FlexAttention has no dropout
        if torch.compiler.is_compiling():  # Dynamo fuses it into the block's graph; no fallback inside a graph
            if v.device.type == "cpu":  # Inductor's CPU kernel misreads a value that is a strided view (torch 2.13)
                v = v.contiguous()
            return flex_attention(q, k, v, block_mask=mask.block, enable_gqa=enable_gqa)
        flex = _compiled_flex() if q.device.type == "cuda" else flex_attention
        try:
            return flex(q, k, v, block_mask=mask.block, enable_gqa=enable_gqa)
        except Exception as e:  # a torch/triton that cannot build the kernel: dense masks from now on
            if q.device.type == "cpu":
                raise
            _flex_broken = True
            logger.warning("FlexAttention failed (%s: %s); document masks fall back to dense SDPA masks",
                           type(e).__name__, e)
    if isinstance(mask, FlexMask):
        mask = dense_document_mask(mask.position_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, enable_gqa=enable_gqa)
