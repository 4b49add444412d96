"""Accelerator facts: dense bf16 peak, memory, link bandwidths, one entry per exact part, and the efficiencies a
GPU reaches on JetMoE's own work (what bench/gpu.py measures).

`PEAK_TFLOPS` is the one peak table: the vendors' dense (no sparsity) bf16 tensor-core TFLOP/s, keyed by the
exact name a device reports (`torch.cuda.get_device_name()`; "NVIDIA H200" seen on an H200), never by a substring:
an H100 PCIe is not an H100 SXM. The planner's `cluster.gpu` names a part of the same table; the trainer's MFU
reads the peak of the device it runs on. Link bandwidths are per GPU and per direction (NVLink 4: 900 GB/s both
ways; one 400 Gb/s InfiniBand NIC per GPU, as in DGX/HGX H100 and H200 nodes; A100 nodes: NVLink 3 and 200 Gb/s
NICs).
"""

from dataclasses import dataclass, replace

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
    hbm_datasheet_gbps: float  # the vendor's memory bandwidth (the measured copy rate is lower)


def _part(name: str, device: str, memory_gib: float, intra: float, inter: float, hbm: float) -> GPU:
    return GPU(name, PEAK_TFLOPS[device], memory_gib, intra, inter, hbm)


GPUS = {  # cluster.gpu -> the part
    "h100": _part("h100", "NVIDIA H100 80GB HBM3", 79.6, 450.0, 50.0, 3350.0),
    "h100_pcie": _part("h100_pcie", "NVIDIA H100 PCIe", 79.6, 64.0, 50.0, 2000.0),
    "h100_nvl": _part("h100_nvl", "NVIDIA H100 NVL", 93.1, 300.0, 50.0, 3900.0),  # NVLink bridge: pairs only
    "h200": _part("h200", "NVIDIA H200", 140.4, 450.0, 50.0, 4800.0),
    "a100": _part("a100", "NVIDIA A100-SXM4-80GB", 79.2, 300.0, 25.0, 2039.0),
}

# Share of a link's data-sheet bandwidth that NCCL reaches on large messages (nccl-tests' bus bandwidth on
# H100 systems is about 80% of NVLink's and of the node's InfiniBand). An assumption, not measured here: no
# multi-GPU machine was available; bench/gpu.py runs on one GPU.
LINK_EFFICIENCY = 0.8
# Fixed cost of one collective or point-to-point call (NCCL's small-message latency, order of 10 us inside a
# node and 20 us across nodes in nccl-tests); an assumption like LINK_EFFICIENCY.
CALL_LATENCY_S = {"nvlink": 10e-6, "infiniband": 20e-6}


@dataclass(frozen=True)
class Efficiencies:
    """What one GPU sustains on a training step's kinds of work, at JetMoE's shapes (bf16).

    The keys are those of bench/gpu.py's `calibration` object; `source` says where the numbers come from."""

    dense_gemm_tflops: float  # one [4096 x 2048] x [2048 x 11264] matmul, forward + both backward matmuls
    grouped_gemm_tflops: float  # torch._grouped_mm over 8 experts, the MoE's shape, balanced routing
    attention_tflops: float  # causal SDPA forward + backward, 32 query / 16 kv heads of 128, 4096 tokens
    hbm_gbps: float  # a large fp32 copy: bytes read + written per second
    grad_accumulation_ns_per_param: float  # bench/gpu.py's accumulation sweep (ACCUMULATION_SWEEP_BYTES_PER_PARAM)
    optimizer_ns_per_param: float  # AdamW on the fp32 master + the bf16 copy refreshed, per parameter stepped
    source: str


# What bench/gpu.py's accumulation sweep moves per parameter (BF16_Optimizer's per micro-batch work without
# autograd's part): hp.add_(lp.grad.to(fp32)) reads 2 and writes 4 for the cast, reads 8 and writes 4 for the add;
# zeroing the bf16 gradient writes 2. Its ns per parameter thus gives the rate of such sweeps.
ACCUMULATION_SWEEP_BYTES_PER_PARAM = 20


# Measured by bench/gpu.py on one H200 (torch 2.11.0+cu130, 2026-12-04; /work/notes/gpu_run1/gpu_check.json).
H200_MEASURED = Efficiencies(
    dense_gemm_tflops=657.6, grouped_gemm_tflops=559.6, attention_tflops=297.0, hbm_gbps=4206.4,
    grad_accumulation_ns_per_param=0.006197, optimizer_ns_per_param=0.02357,
    source="measured by bench/gpu.py on an H200 (torch 2.11, 2026-12-04)",
)


def derived_from_h200(gpu: GPU) -> Efficiencies:
    """Another part's efficiencies from the H200's measured ones: matmul and attention at the same share of the
    part's peak, bandwidth-bound work scaled by the ratio of data-sheet memory bandwidths. For the H100 SXM this
    keeps the compute numbers (same GH100 chip and peak) and scales the memory-bound ones by 3.35/4.8 TB/s."""
    h200 = GPUS["h200"]
    compute = gpu.peak_tflops / h200.peak_tflops
    memory = gpu.hbm_datasheet_gbps / h200.hbm_datasheet_gbps
    m = H200_MEASURED
    return Efficiencies(
        dense_gemm_tflops=m.dense_gemm_tflops * compute, grouped_gemm_tflops=m.grouped_gemm_tflops * compute,
        attention_tflops=m.attention_tflops * compute, hbm_gbps=m.hbm_gbps * memory,
        grad_accumulation_ns_per_param=m.grad_accumulation_ns_per_param / memory,
        optimizer_ns_per_param=m.optimizer_ns_per_param / memory,
        source=(f"derived from the H200 measurement: its share of peak on {gpu.peak_tflops:g} TFLOP/s, memory-bound "
                f"work scaled to {gpu.hbm_datasheet_gbps / 1000:g} TB/s (not measured on a {gpu.name})"),
    )


DEFAULT_EFFICIENCIES = {"h200": H200_MEASURED, **{name: derived_from_h200(gpu) for name, gpu in GPUS.items()
                                                  if name != "h200"}}


def device_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the device that reports this exact name; None for a part the table does not know."""
    return PEAK_TFLOPS.get(device_name)


def gpu_spec(name: str, peak_tflops: float | None = None, memory_gib: float | None = None) -> GPU:
    """The table entry for `name`, with the user's peak/memory overrides applied (checked by the cluster section)."""
    key = str(name).lower()
    if key not in GPUS:
        raise JetMoEError(
            f"unknown cluster.gpu={name!r}; use one of {sorted(GPUS)} "
            "(or set cluster.peak_tflops and cluster.gpu_memory_gib for another part)"
        )
    g = GPUS[key]
    return replace(g, peak_tflops=float(peak_tflops) if peak_tflops is not None else g.peak_tflops,
                   memory_gib=float(memory_gib) if memory_gib is not None else g.memory_gib)


def default_efficiencies(gpu: GPU) -> Efficiencies:
    """The part's stated efficiencies; with a user's peak (cluster.peak_tflops) the compute ones scale with it."""
    table = DEFAULT_EFFICIENCIES[gpu.name]
    base = GPUS[gpu.name].peak_tflops
    if gpu.peak_tflops == base:
        return table
    scale = gpu.peak_tflops / base
    return replace(table, dense_gemm_tflops=table.dense_gemm_tflops * scale,
                   grouped_gemm_tflops=table.grouped_gemm_tflops * scale,
                   attention_tflops=table.attention_tflops * scale,
                   source=f"{table.source}; compute scaled to cluster.peak_tflops={gpu.peak_tflops:g}")
