"""Activation recompute, applied to blocks from outside the model (the one implementation).

A block so wrapped keeps only its inputs in forward and runs again in backward. The recompute does not
route again: each call records its routing decisions (every router's chosen experts, every dispatcher's
plan, with its host-side split sizes) and the recompute of that same call replays them. So the
recomputed block takes exactly the forward's shapes and, under expert parallelism, skips the count
exchange and its host sync (torchtitan saves routing and all-to-all outputs for the same reason); only
the token all-to-alls run again. `JetMoEConfig.gradient_checkpointing` and
`parallel.activation_checkpointing` both map to this.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from jetmoe.model import SparseLayer

_current: contextvars.ContextVar["RoutingMemo | None"] = contextvars.ContextVar("jetmoe_routing_memo", default=None)


class RoutingMemo:
    """The routing decisions of one checkpointed block call, in call order: recorded by its forward,
    replayed by its recompute (1F1B recomputes calls in another order than it ran them: one memo per call)."""

    def __init__(self) -> None:
        self.decisions: list = []
        self.replaying = False
        self.cursor = 0

    def remember(self, decide: Callable):
        if not self.replaying:
            self.decisions.append(decide())
            return self.decisions[-1]
        decision = self.decisions[self.cursor]
        self.cursor += 1
        return decision


def _remembered(decide: Callable) -> Callable:
    """`decide` itself outside a checkpointed call; inside one, recorded then replayed."""

    @functools.wraps(decide)
    def wrapper(*args, **kwargs):
        memo = _current.get()
        if memo is None:
            return decide(*args, **kwargs)
        return memo.remember(lambda: decide(*args, **kwargs))

    wrapper.remembered = True
    return wrapper


class ReplayingDispatcher:
    """A sparse layer's dispatcher whose plans are recorded and replayed like the router's choices."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.plan = _remembered(inner.plan)
        self.dispatch = inner.dispatch
        self.combine = inner.combine


def _recomputed(forward, *args):
    if not torch.is_grad_enabled():
        return forward(*args)
    memo = RoutingMemo()

    def run(*inputs):
        token = _current.set(memo)
        try:
            return forward(*inputs)
        finally:
            _current.reset(token)
            memo.replaying, memo.cursor = True, 0  # the next run of this call is its recompute

    return checkpoint(run, *args, use_reentrant=False)


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward, replaying its routing. The block's forward is wrapped
    in place, so parameter names (and with them checkpoints and the pipeline's name map) stay as they are.
    Apply after expert parallelism (it wraps the dispatchers that expert parallelism installs)."""
    for block in blocks:
        if getattr(block.forward, "_recomputed", False):
            continue
        for layer in block.modules():
            if isinstance(layer, SparseLayer):
                if not getattr(layer.router.choose, "remembered", False):
                    layer.router.choose = _remembered(layer.router.choose)
                if not isinstance(layer.dispatcher, ReplayingDispatcher):
                    layer.dispatcher = ReplayingDispatcher(layer.dispatcher)
        wrapped = functools.partial(_recomputed, block.forward)
        wrapped._recomputed = True
        block.forward = wrapped
