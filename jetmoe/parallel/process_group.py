"""The default process group: started once per process, for any launcher (python, torchrun, deepspeed,
Slurm tasks), and again after a `torchrun --max-restarts` restart.

On CUDA the group serves CPU and CUDA tensors (`cpu:gloo,cuda:nccl`): a plain `nccl` group rejects the
small CPU tensors of stop signals and bookkeeping (torch maps "nccl" to CUDA tensors only).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

from jetmoe.errors import JetMoEError


def backend_for(cuda: bool) -> str:
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def served_device_types(backend: str) -> set[str]:
    """Device types whose tensors a group with this backend string accepts (torch 2.13: "nccl" alone serves
    CUDA tensors only, "gloo" alone CPU tensors, "cpu:gloo,cuda:nccl" both)."""
    if ":" in backend:
        return {part.split(":", 1)[0] for part in backend.split(",")}
    return {"nccl": {"cuda"}, "gloo": {"cpu"}}.get(backend, {"cpu", "cuda"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(cuda: bool, timeout: timedelta) -> tuple[int, int]:
    """Start (or reuse) the default process group; returns (rank, world size). DeepSpeed's comm joins it
    later (`start_deepspeed_comm`), so that user errors found in between come before DeepSpeed's output.

    A plain `python` process gets a one-rank environment first: without RANK/WORLD_SIZE DeepSpeed would
    try MPI discovery."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_task_env()  # e.g. hydra/launcher=submitit_slurm with several tasks: no launcher set RANK
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group(backend_for(cuda), store=restart_store(timeout), timeout=timeout,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def start_deepspeed_comm(cuda: bool, timeout: timedelta) -> None:
    """DeepSpeed's comm on the default group (it builds its shared-memory op and prints about it)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timeout)  # reuses the group


def close_process_group() -> None:
    """After a run that ended well on every rank: meet, then tear the group down. Left to interpreter exit,
    a rank whose peers already exited can abort in gloo's destructor ("terminate called without an active
    exception"), which torchrun reports as a failed worker."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _HOST_TWINS.clear()


_HOST_TWINS: dict[tuple[int, ...], object] = {}


def host_twin(group):
    """A gloo group over the same ranks as `group`, for collectives on host tensors from a background thread
    (checkpoint writes) while training keeps using `group`. Created once, by the members only (the name is
    hashed from the ranks, so other ranks need not call it); call it from the main thread."""
    import torch.distributed as dist

    ranks = tuple(dist.get_process_group_ranks(group))
    if ranks not in _HOST_TWINS:
        _HOST_TWINS[ranks] = dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
    return _HOST_TWINS[ranks]


def _export_slurm_task_env() -> None:
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise JetMoEError("several Slurm tasks but no RANK in the environment and submitit is not installed; "
                          "start the tasks through torchrun (launch/slurm.sbatch) or pip install submitit") from None
    TorchDistributedEnvironment().export()


def restart_store(timeout: timedelta):
    """A store of its own for each `torchrun --max-restarts` restart attempt, else None (env:// rendezvous).

    torchrun's agent keeps one TCPStore for the whole job; after a restart the new workers would find the
    dead workers' addresses still in it (gloo then fails with "connectFullMesh ... Connection refused").
    Giving each restart attempt its own key prefix avoids the stale entries."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or "MASTER_ADDR" not in os.environ:
        return None
    from torch.distributed import PrefixStore, TCPStore

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                     is_master=not agent_hosts_it and rank == 0, timeout=timeout, multi_tenant=True)
    return PrefixStore(f"jetmoe/restart_{attempt}", store)
