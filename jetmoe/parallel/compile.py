"""Regional torch.compile of the transformer blocks (`train.compile`), applied from outside the model.

Each JetMoEBlock's forward (its norms, MoA and MoE, given the rotary angles and the mask that the model or the
stage computed once) is one graph, compiled in place (parameter names unchanged). Every block runs the same code,
so Dynamo's cache on that code serves them all: one compilation, whatever the number of blocks or stages.
Activation recompute wraps the compiled forward (compile first, then `apply_activation_checkpointing`).

Nothing whose size depends on routing enters a graph, so steps whose expert counts differ reuse the same
graphs. Local dispatch has static shapes (T * k slots) and stays in the graphs; the grouped matmul is our own
operator (`jetmoe::grouped_mm`, M rows in and out, fp32 and bf16). The expert-parallel dispatcher's plan,
dispatch and combine sit behind deliberate graph breaks (collectives, one host sync, rows that change every
step).

At scale (96 ranks): Inductor's cache is on each node's own disk by default (`train.compile_cache_dir` names
another; a shared folder is raced by every rank), and each rank gets its node's cores divided by its ranks as
compile workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

COMPILE_TIME_KEYS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def compile_enabled(mode, cuda: bool) -> bool:
    """`train.compile`: auto (on with CUDA; off on CPU, where bench/model_cpu.py measured 4-5% per step, not
    worth 10-20 s of compiling in the short runs a CPU does), true, false."""
    mode = {True: "true", False: "false"}.get(mode, str(mode).lower())  # a choice the train section checked
    return cuda if mode == "auto" else mode == "true"


def node_local_cache_dir() -> Path:
    """Where a node keeps its Inductor cache by default: its own disk ($SLURM_TMPDIR, $TMPDIR, else /tmp), one
    folder per user. Ranks of many nodes compiling into one shared (network) folder race on its lock files and
    wait on every lookup; the ranks of one node share theirs."""
    root = os.environ.get("SLURM_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return Path(root) / f"jetmoe-inductor-{os.getuid()}"


def use_cache_dir(cache_dir: str | Path | None) -> Path:
    """Point Inductor's (and Triton's) on-disk cache at `cache_dir` (None: `node_local_cache_dir()`) unless the
    user chose one in TORCHINDUCTOR_CACHE_DIR (Inductor writes its temp-directory default into the environment the
    first time it looks)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir) if cache_dir else node_local_cache_dir())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def ranks_on_this_node() -> int:
    """Processes a launcher started on this node (torchrun and the deepspeed launcher: LOCAL_WORLD_SIZE; Slurm:
    SLURM_NTASKS_PER_NODE), 1 when none says."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0]  # Slurm may write "8(x12)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cap_compile_threads() -> int:
    """Inductor's compile workers for this rank: the node's cores shared by its ranks (Inductor's default is every
    core per process: 8 ranks on a 128-core node would start 1024 workers), unless the user set
    TORCHINDUCTOR_COMPILE_THREADS. Returns the count in force."""
    import torch._inductor.config as inductor

    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        inductor.compile_threads = max(1, cores // ranks_on_this_node())
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(inductor.compile_threads)  # child processes too
    return int(inductor.compile_threads)


def compile_blocks(blocks: Iterable[nn.Module]) -> int:
    """Compile each block's forward (norms, MoA, MoE; one graph per block) in place; returns how many blocks. The
    rotary angles and the attention mask are computed outside, in eager, and come in as inputs. Call before
    activation checkpointing, which then recomputes the compiled block."""
    n = 0
    for block in blocks:
        if not getattr(block.forward, "_jetmoe_compiled", False):
            block.forward = torch.compile(block.forward)
            block.forward._jetmoe_compiled = True
        n += 1
    return n


def compile_stats() -> dict:
    """Dynamo's counters so far: frames it compiled (a growth after warm-up is a recompilation), graphs,
    graph breaks, and seconds spent compiling (Dynamo + Inductor, forward and backward graphs)."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    seconds = sum(sum(v) for k, v in compilation_time_metrics.items() if k in COMPILE_TIME_KEYS)
    return {"frames": counters["frames"].get("total", 0), "graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()), "compile_s": seconds}
