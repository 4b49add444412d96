"""A process group that survives `torchrun --max-restarts`.

torchrun's agent keeps one TCPStore for the whole job; after a restart the new workers would find
the dead workers' addresses still in it (gloo then fails with "connectFullMesh ... Connection
refused"). Giving each restart attempt its own key prefix avoids the stale entries."""

from __future__ import annotations

import os
from datetime import timedelta


def restart_store(timeout: timedelta):
    """A store for init_process_group on restart attempts (TORCHELASTIC_RESTART_COUNT > 0), else None."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed import PrefixStore, TCPStore

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                     is_master=not agent_hosts_it and rank == 0, timeout=timeout, multi_tenant=True)
    return PrefixStore(f"jetmoe/restart_{attempt}", store)


def init_process_group_for_restart(backend: str, timeout: timedelta) -> None:
    """Call before deepspeed.init_distributed (which then reuses the group); a no-op on a first attempt."""
    import torch.distributed as dist

    store = restart_store(timeout)
    if store is not None and not dist.is_initialized():
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
