"""Causal attention over packed documents: which mask a block uses, and the attention call that applies it.

A document starts wherever a position id is not the previous one plus one (packed data restarts at 0).
`document_mask` on the attention layer says whether to look for documents:
  "off"   plain causal attention (SDPA's flash/cuDNN kernels); no look at the position ids, no host sync;
  "on"    always a document mask, built on the device without a host sync;
  "auto"  (the default, for direct calls such as `model(ids, position_ids=...)`) a mask only when some row
          restarts, which costs one host sync per block. Training sets "on" or "off" from data.document_mask.
The mask is a FlexAttention block mask where FlexAttention can run it (CUDA; it has no CPU backward), else a
dense [B, 1, T, T] boolean mask for SDPA.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from jetmoe.errors import JetMoEError

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: the dense mask serves
    create_block_mask = flex_attention = None

MODES = ("auto", "on", "off")
log = logging.getLogger(__name__)

# "auto": FlexAttention on CUDA; True also tries it on CPU (forward only: it has no CPU backward); False never.
use_flex: bool | str = "auto"
_compiled_flex = None
_flex_broken = False
_last: tuple | None = None  # (weakref to position_ids, its version, kind, mask): blocks of one forward share it


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
    global _last
    if mode not in MODES:
        raise JetMoEError(f"document_mask={mode!r} is unknown; use one of {', '.join(MODES)}")
    if position_ids is None or mode == "off":
        return None
    if mode == "auto" and not bool((position_ids[:, 1:] != position_ids[:, :-1] + 1).any()):  # host sync
        return None
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled()
    kind = "flex" if _flex_usable(position_ids.device, needs_grad) else "dense"
    if _last is not None and _last[0]() is position_ids and _last[1] == position_ids._version and _last[2] == kind:
        return _last[3]
    mask = flex_document_mask(position_ids) if kind == "flex" else dense_document_mask(position_ids)
    _last = (weakref.ref(position_ids), position_ids._version, kind, mask)
    return mask


def _flex(q, k, v, block_mask, enable_gqa):
    global _compiled_flex
    if q.device.type != "cuda":
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    if _compiled_flex is None:  # eager FlexAttention on CUDA is an unfused reference: always compile it
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float = 0.0,
           enable_gqa: bool = False) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, hd] over k, v [B, Hkv, T, hd] under `mask` (see attention_mask)."""
    global _flex_broken
    if isinstance(mask, FlexMask):
        if dropout_p == 0.0:  # FlexAttention has no dropout
            try:
                return _flex(q, k, v, mask.block, enable_gqa)
            except Exception as e:  # a torch/triton that cannot build the kernel: dense masks from now on
                if q.device.type == "cpu":
                    raise
                _flex_broken = True
                log.warning("FlexAttention failed (%s: %s); document masks fall back to dense SDPA masks",
                            type(e).__name__, e)
        mask = dense_document_mask(mask.position_ids)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                          dropout_p=dropout_p, enable_gqa=enable_gqa)


def set_document_mask(model: nn.Module, mode: str | bool) -> None:
    """Set how every attention layer of `model` masks documents: True/"on", False/"off" or "auto"."""
    from jetmoe.model.attention import MoA

    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in MODES:
        raise JetMoEError(f"document_mask={mode!r} is unknown; use one of {', '.join(MODES)}")
    for sub in model.modules():
        if isinstance(sub, MoA):
            sub.document_mask = mode
