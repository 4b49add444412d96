"""Count device-to-host syncs on any device, CPU included: every op that must read a tensor's value on the host
(`.item()`, `bool(t)`, `int(t)`, `.tolist()`) or whose output shape depends on tensor values (nonzero, ...).

On CUDA, `torch.cuda.set_sync_debug_mode` reports the same syncs; this counter also runs in CPU tests."""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops whose output needs tensor values on the host (their CUDA kernels synchronise).
_SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
                "unique_consecutive", "unique_dim", "bincount"}


class _SyncMode(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _SYNCING_OPS:
            self.counts[name] += 1
        elif name == "repeat_interleave" and kwargs.get("output_size") is None:
            self.counts[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs():
    """with count_host_syncs() as counts: ... ; then sum(counts.values()) syncs, by op name in `counts`.

    Backward passes run inside the context are counted too (autograd runs them on this thread's modes)."""
    counts: Counter = Counter()
    original = torch.Tensor.tolist

    def tolist(self):
        counts["tolist"] += 1
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _SyncMode(counts):
            yield counts
    finally:
        torch.Tensor.tolist = original
