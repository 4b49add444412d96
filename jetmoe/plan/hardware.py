"""Accelerator facts the planner needs: dense bf16 peak, memory, and link bandwidths.

Peak numbers are the vendors' dense (no sparsity) bf16 tensor-core figures for the SXM parts;
bandwidths are per GPU and per direction.
"""

from dataclasses import dataclass

from jetmoe.errors import JetMoEError


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    memory_gib: float  # what the device reports as total
    intra_node_gbps: float  # NVLink, GB/s per direction
    inter_node_gbps: float  # one InfiniBand NIC per GPU, GB/s per direction


GPUS = {
    "h100": GPU("h100", 989.0, 79.6, 450.0, 50.0),
    "h200": GPU("h200", 989.0, 140.4, 450.0, 50.0),
    "a100": GPU("a100", 312.0, 79.2, 300.0, 25.0),
}


def gpu_spec(name: str, peak_tflops: float | None = None, memory_gib: float | None = None) -> GPU:
    """The table entry for `name`, with the user's peak/memory overrides applied."""
    key = str(name).lower()
    if key not in GPUS:
        raise JetMoEError(
            f"unknown cluster.gpu={name!r}; use one of {sorted(GPUS)} "
            "(or set cluster.peak_tflops and cluster.gpu_memory_gib for another part)"
        )
    g = GPUS[key]
    return GPU(
        g.name,
        float(peak_tflops) if peak_tflops else g.peak_tflops,
        float(memory_gib) if memory_gib else g.memory_gib,
        g.intra_node_gbps,
        g.inter_node_gbps,
    )
