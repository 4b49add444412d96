"""Put the pieces together: one layout of one model on one cluster -> a Plan (numbers + verdicts)."""

from dataclasses import dataclass, field

from jetmoe.errors import JetMoEError
from jetmoe.plan.checkpoint import CheckpointPlan, checkpoint_plan
from jetmoe.plan.hardware import GPU
from jetmoe.data.loader import micro_batches_per_step
from jetmoe.parallel.topology import make_layout
from jetmoe.plan.layout import ClusterLayout, StageParams, stage_params
from jetmoe.plan.memory import GIB, Precision, StageMemory, stage_memory
from jetmoe.plan.params import ModelShape, ParamCounts, count_params
from jetmoe.plan.throughput import (
    all_to_all_bytes,
    bubble_fraction,
    flops_per_token,
    micro_batches_for_bubble,
    pipeline_bytes,
    ring_reduce_bytes,
)

BUBBLE_WARN = 0.10
MEMORY_HEADROOM = 0.90  # share of device memory the plan may use (allocator slack, NCCL, CUDA context)


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    layout: ClusterLayout
    gpu: GPU
    seq_len: int
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per micro-batch
    mfu: float  # model FLOPs utilization while a stage is busy (the bubble comes on top)
    precision: Precision = Precision()
    checkpointing: bool = False
    eager_attention: bool = False
    document_mask: bool = False  # data.document_mask: attention keeps a seq x seq bias per block
    storage_gbps: float = 2.0  # cluster.storage_gbps: checkpoint write bandwidth per node, GB/s


@dataclass
class Plan:
    inputs: PlanInputs
    counts: ParamCounts
    stages: list[StageParams]
    memory: list[StageMemory]
    micro_batches: int
    bubble: float
    flops_dense: int
    flops_attention: int
    tokens_per_step: int
    step_seconds: float
    tokens_per_sec: float
    a2a_bytes_per_rank: int
    pipeline_bytes_per_boundary: int
    dp_bytes_per_rank: int
    comm_seconds: float
    fits: bool
    checkpoint: CheckpointPlan | None = None
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.peak)

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_sec * 86400

    def summary(self) -> dict:
        i = self.inputs
        return {
            "total_params": self.counts.total,
            "active_params": self.counts.active,
            "params_per_stage": [s.total for s in self.stages],
            "params_per_rank": [s.per_rank for s in self.stages],
            "memory_per_gpu_gib": round(self.peak.peak / GIB, 3),
            "memory_per_stage_gib": [round(m.peak / GIB, 3) for m in self.memory],
            "gpu_memory_gib": i.gpu.memory_gib,
            "fits": self.fits,
            "bubble_fraction": round(self.bubble, 4),
            "micro_batches": self.micro_batches,
            "flops_per_token": self.flops_dense + self.flops_attention,
            "step_seconds": round(self.step_seconds, 3),
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": round(self.tokens_per_sec, 1),
            "tokens_per_day": round(self.tokens_per_day),
            "mfu_assumed": i.mfu,
            "gpus": i.layout.gpus,
            "gpu": i.gpu.name,
            "pp": i.layout.pp,
            "dp": i.layout.dp,
            "ep": i.layout.ep,
            "all_to_all_bytes_per_rank_per_step": self.a2a_bytes_per_rank,
            "pipeline_bytes_per_boundary_per_step": self.pipeline_bytes_per_boundary,
            "checkpoint_bytes": self.checkpoint.total_bytes,
            "checkpoint_bytes_per_rank": self.checkpoint.per_rank_bytes,
            "checkpoint_write_seconds": round(self.checkpoint.write_seconds, 2),
            "storage_gbps": self.checkpoint.storage_gbps,
            "warnings": self.warnings,
        }


def _memory(inp: PlanInputs, stages: list[StageParams], micro_batch: int, micro_batches: int,
            checkpointing: bool) -> list[StageMemory]:
    lay = inp.layout
    return [
        stage_memory(
            inp.shape, s.stage, lay.pp, s.blocks, s.dense, s.expert_per_rank, lay.dp, lay.expert_dp,
            micro_batch, inp.seq_len, micro_batches, inp.precision, checkpointing, inp.eager_attention,
            inp.document_mask,
        )
        for s in stages
    ]


def _node(rank: int, lay: ClusterLayout) -> int:
    return rank // lay.gpus_per_node


def _ep_in_node(lay: ClusterLayout) -> bool:
    """Expert groups are ep consecutive ranks (pipe-major, data-minor order)."""
    return all(_node(r, lay) == _node(r - r % lay.ep, lay) for r in range(lay.gpus))


def _stages_in_node(lay: ClusterLayout) -> bool:
    """Whether every stage-to-stage send (rank r to r + dp) stays inside a node."""
    return all(_node(r, lay) == _node(r + lay.dp, lay) for r in range(lay.gpus - lay.dp))


def make_plan(inp: PlanInputs) -> Plan:
    shape, lay = inp.shape, inp.layout
    make_layout(lay.gpus, 0, lay.pp, lay.ep, shape.num_layers, shape.num_experts)
    m = micro_batches_per_step(inp.global_batch, inp.micro_batch, lay.dp)
    per_dp = inp.global_batch // lay.dp
    counts = count_params(shape)
    stages = stage_params(shape, counts, lay)
    memory = _memory(inp, stages, inp.micro_batch, m, inp.checkpointing)

    bubble = bubble_fraction(lay.pp, m)
    f_dense, f_attn = flops_per_token(shape, counts, inp.seq_len)
    tokens = inp.global_batch * inp.seq_len
    busy = tokens * (f_dense + f_attn) / (lay.gpus * inp.gpu.peak_tflops * 1e12 * inp.mfu)
    step = busy / (1 - bubble)

    p = inp.precision.act_bytes
    mb_tokens = inp.micro_batch * inp.seq_len
    a2a = max(all_to_all_bytes(shape, s.blocks, mb_tokens, m, lay.ep, lay.ep_attention, p, inp.checkpointing)
              for s in stages)
    pipe = pipeline_bytes(shape, mb_tokens, m, p) if lay.pp > 1 else 0
    pb = inp.precision.param_bytes
    dp_bytes = max(ring_reduce_bytes(s.dense * pb, lay.dp) + ring_reduce_bytes(s.expert_per_rank * pb, lay.expert_dp)
                   for s in stages)
    a2a_bw = inp.gpu.intra_node_gbps if _ep_in_node(lay) else inp.gpu.inter_node_gbps
    pipe_bw = inp.gpu.intra_node_gbps if _stages_in_node(lay) else inp.gpu.inter_node_gbps
    comm = a2a / (a2a_bw * 1e9) + pipe / (pipe_bw * 1e9)

    budget = inp.gpu.memory_gib * GIB * MEMORY_HEADROOM
    plan = Plan(
        inputs=inp, counts=counts, stages=stages, memory=memory, micro_batches=m, bubble=bubble,
        flops_dense=f_dense, flops_attention=f_attn, tokens_per_step=tokens, step_seconds=step,
        tokens_per_sec=tokens / step, a2a_bytes_per_rank=a2a, pipeline_bytes_per_boundary=pipe,
        dp_bytes_per_rank=dp_bytes, comm_seconds=comm, fits=max(x.peak for x in memory) <= budget,
        checkpoint=checkpoint_plan(stages, lay, counts.embedding if shape.tied else 0, inp.storage_gbps,
                                   pb),
    )
    _advise(plan, per_dp, budget)
    return plan


def _advise(plan: Plan, per_dp: int, budget: float) -> None:
    inp, lay = plan.inputs, plan.inputs.layout
    if not plan.fits:
        worst = plan.peak
        plan.warnings.append(
            f"does not fit: stage {worst.stage} needs {worst.peak / GIB:.1f} GiB per GPU, "
            f"budget {budget / GIB:.1f} GiB ({MEMORY_HEADROOM:.0%} of {inp.gpu.memory_gib} GiB)"
        )
        if not inp.checkpointing:
            ck = _memory(inp, plan.stages, inp.micro_batch, plan.micro_batches, True)
            if max(x.peak for x in ck) <= budget:
                plan.suggestions.append(
                    f"model.gradient_checkpointing=true fits ({max(x.peak for x in ck) / GIB:.1f} GiB per GPU)"
                )
    if plan.bubble > BUBBLE_WARN:
        need = micro_batches_for_bubble(lay.pp, BUBBLE_WARN)
        plan.warnings.append(
            f"pipeline bubble {plan.bubble:.1%} > {BUBBLE_WARN:.0%}: {plan.micro_batches} micro-batches per step "
            f"for pp={lay.pp}; need >= {need}"
        )
        plan.suggestions.append(
            f"train.global_batch_size={lay.dp * inp.micro_batch * need} (dp x micro_batch_size x {need}) "
            f"keeps the bubble at {(lay.pp - 1) / (need + lay.pp - 1):.1%}"
        )
    if plan.comm_seconds > 0.2 * plan.step_seconds:
        plan.warnings.append(
            f"communication ~{plan.comm_seconds:.2f} s per step is > 20% of the {plan.step_seconds:.2f} s step; "
            "keep ep inside a node or raise the micro-batch count"
        )
    # micro-batch sizes that divide the per-rank batch, fit, and keep the bubble small
    good = []
    for mb in range(1, per_dp + 1):
        if per_dp % mb:
            continue
        m = per_dp // mb
        peak = max(x.peak for x in _memory(inp, plan.stages, mb, m, inp.checkpointing))
        b = (lay.pp - 1) / (m + lay.pp - 1)
        if peak <= budget and b <= BUBBLE_WARN:
            good.append((mb, m, b, peak))
    if good:
        mb, m, b, peak = good[-1]  # the largest micro-batch that still qualifies: best kernel efficiency
        if mb != inp.micro_batch:
            plan.suggestions.append(
                f"train.micro_batch_size={mb} -> {m} micro-batches, bubble {b:.1%}, {peak / GIB:.1f} GiB per GPU"
            )
        plan.suggestions.append(
            "micro-batch sizes that fit with bubble <= 10%: "
            + ", ".join(f"{mb} ({m} micro-batches)" for mb, m, _, _ in good)
        )
    elif not plan.fits:
        plan.suggestions.append("no micro-batch size fits: add GPUs, raise parallel.pp or parallel.ep, "
                                "or turn on parallel.activation_checkpointing")
