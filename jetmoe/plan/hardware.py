"""Accelerator facts: dense bf16 peak, memory and link bandwidths, one entry per exact part.

`PEAK_TFLOPS` is the one peak table: the vendors' dense (no sparsity) bf16 tensor-core TFLOP/s, keyed by the
exact name a device reports (`torch.cuda.get_device_name()`; "NVIDIA H200" seen on an H200), never by a substring:
an H100 PCIe is not an H100 SXM. The planner's `cluster.gpu` names a part of the same table; the trainer's MFU
reads the peak of the device it runs on. Bandwidths are per GPU and per direction.
"""

from dataclasses import dataclass

from jetmoe.errors import JetMoEError

PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,  # H100 SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0,
    "NVIDIA H200 NVL": 835.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
}


@dataclass(frozen=True)
class GPU:
    name: str
    peak_tflops: float  # dense bf16
    memory_gib: float  # what the device reports as total
    intra_node_gbps: float  # NVLink (PCIe parts: PCIe Gen5 x16), GB/s per direction
    inter_node_gbps: float  # one InfiniBand NIC per GPU, GB/s per direction


def _part(name: str, device: str, memory_gib: float, intra: float, inter: float) -> GPU:
    return GPU(name, PEAK_TFLOPS[device], memory_gib, intra, inter)


GPUS = {  # cluster.gpu -> the part
    "h100": _part("h100", "NVIDIA H100 80GB HBM3", 79.6, 450.0, 50.0),
    "h100_pcie": _part("h100_pcie", "NVIDIA H100 PCIe", 79.6, 64.0, 50.0),
    "h100_nvl": _part("h100_nvl", "NVIDIA H100 NVL", 93.1, 300.0, 50.0),  # NVLink bridge: pairs of GPUs only
    "h200": _part("h200", "NVIDIA H200", 140.4, 450.0, 50.0),
    "a100": _part("a100", "NVIDIA A100-SXM4-80GB", 79.2, 300.0, 25.0),
}


def device_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the device that reports this exact name; None for a part the table does not know."""
    return PEAK_TFLOPS.get(device_name)


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
