"""Run a function on N gloo CPU ranks (torch.multiprocessing.spawn) for the expert-parallel tests."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.launch_util import free_port


def _entry(rank, world, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # Leave together: a rank tearing its groups down while a peer still uses them can abort in gloo.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args):
    """Run fn(rank, world, *args) on `world` ranks; an exception on any rank fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
