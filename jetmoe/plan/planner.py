"""Put the pieces together: one layout of one model on one cluster -> a Plan (numbers + verdicts)."""

from dataclasses import dataclass, field

from jetmoe.data.loader import micro_batches_per_step
from jetmoe.parallel.topology import make_layout
from jetmoe.plan.calibration import Calibration
from jetmoe.plan.checkpoint import CheckpointPlan, checkpoint_plan
from jetmoe.plan.costs import stage_costs
from jetmoe.plan.engine_model import TODAY, EngineBehaviour
from jetmoe.plan.hardware import GPU, Efficiencies
from jetmoe.plan.layout import ClusterLayout, StageParams, stage_params
from jetmoe.plan.memory import GIB, Precision, StageMemory, stage_memory
from jetmoe.plan.params import ModelShape, ParamCounts, count_params
from jetmoe.plan.step import StepBreakdown, breakdown
from jetmoe.plan.throughput import bubble_fraction, flops_per_token, micro_batches_for_bubble
from jetmoe.plan.traffic import StageTraffic, step_traffic

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
    efficiencies: Efficiencies  # what the GPU sustains on each kind of work (hardware defaults or a calibration)
    mfu: float | None = None  # cluster.mfu: if set, stages compute at this share of peak (see costs.stage_costs)
    precision: Precision = Precision()
    checkpointing: bool = False
    eager_attention: bool = False
    document_mask: bool = False  # data.document_mask: attention keeps a seq x seq bias per block
    storage_gbps: float = 2.0  # cluster.storage_gbps: checkpoint write bandwidth per node, GB/s
    engine: EngineBehaviour = TODAY
    compiled: bool = True  # train.compile resolved for a GPU run (the memory-bound traffic assumes compiled blocks)
    calibration: Calibration | None = None


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
    traffic: list[StageTraffic]
    step: StepBreakdown
    fits: bool
    checkpoint: CheckpointPlan | None = None
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.memory, key=lambda m: m.peak)

    @property
    def step_seconds(self) -> float:
        return self.step.step_seconds

    @property
    def tokens_per_sec(self) -> float:
        return self.tokens_per_step / self.step_seconds

    @property
    def tokens_per_day(self) -> float:
        return self.tokens_per_sec * 86400

    @property
    def predicted_mfu(self) -> float:
        i = self.inputs
        flops = self.tokens_per_step * (self.flops_dense + self.flops_attention)
        return flops / (i.layout.gpus * i.gpu.peak_tflops * 1e12 * self.step_seconds)

    def bytes_per_rank(self, category: str, wire: bool = False) -> int:
        """The busiest stage's rank: what it hands its `category` calls in a step (or sends on the wire)."""
        return max(t.wire(category) if wire else t.payload(category) for t in self.traffic)

    @property
    def pipeline_bytes_per_boundary(self) -> int:
        """Hidden states forward plus their gradients back across one stage boundary, per pipeline, per step."""
        return sum(x.payload_bytes for x in self.traffic[0].transfers if x.op == "send") * 2 if self.inputs.layout.pp > 1 else 0

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
            "step_seconds": round(self.step_seconds, 4),
            "step_breakdown_s": {k: round(v, 4) for k, v in self.step.parts.items()},
            "predicted_mfu": round(self.predicted_mfu, 4),
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_sec": round(self.tokens_per_sec, 1),
            "tokens_per_day": round(self.tokens_per_day),
            "mfu_assumed": i.mfu,
            "efficiencies": {k: v for k, v in vars(i.efficiencies).items()},
            "engine": vars(i.engine).copy(),
            "gpus": i.layout.gpus,
            "gpu": i.gpu.name,
            "pp": i.layout.pp,
            "dp": i.layout.dp,
            "ep": i.layout.ep,
            "bytes_per_rank_per_step": {c: self.bytes_per_rank(c) for c in ("dp", "pp", "ep")},
            "wire_bytes_per_rank_per_step": {c: self.bytes_per_rank(c, wire=True) for c in ("dp", "pp", "ep")},
            "all_to_all_bytes_per_rank_per_step": self.bytes_per_rank("ep", wire=True),
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


def make_plan(inp: PlanInputs, advise: bool = True) -> Plan:
    """advise=False skips the warnings and suggestions (the layout search plans hundreds of layouts)."""
    shape, lay = inp.shape, inp.layout
    make_layout(lay.gpus, 0, lay.pp, lay.ep, shape.num_layers, shape.num_experts)
    m = micro_batches_per_step(inp.global_batch, inp.micro_batch, lay.dp)
    counts = count_params(shape)
    stages = stage_params(shape, counts, lay, inp.engine.partition_balances, inp.seq_len)
    memory = _memory(inp, stages, inp.micro_batch, m, inp.checkpointing)
    f_dense, f_attn = flops_per_token(shape, counts, inp.seq_len)

    p, bf16 = inp.precision.act_bytes, inp.precision.param_bytes == 2
    traffic = step_traffic(shape, stages, lay, inp.micro_batch * inp.seq_len, m, p, inp.precision.param_bytes,
                           inp.checkpointing, inp.engine)
    costs = stage_costs(shape, counts, stages, traffic, lay, inp.gpu, inp.efficiencies, inp.engine, inp.micro_batch,
                        inp.seq_len, m, p, bf16, inp.checkpointing, inp.mfu)
    budget = inp.gpu.memory_gib * GIB * MEMORY_HEADROOM
    plan = Plan(
        inputs=inp, counts=counts, stages=stages, memory=memory, micro_batches=m, bubble=bubble_fraction(lay.pp, m),
        flops_dense=f_dense, flops_attention=f_attn, tokens_per_step=inp.global_batch * inp.seq_len,
        traffic=traffic, step=breakdown(costs, m, inp.engine), fits=max(x.peak for x in memory) <= budget,
        checkpoint=checkpoint_plan(stages, lay, counts.embedding if shape.tied else 0, inp.storage_gbps,
                                   inp.precision.param_bytes),
    )
    if advise:
        _advise(plan, inp.global_batch // lay.dp, budget)
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
    parts = plan.step.parts
    comm = {k: parts[k] for k in ("dp_reduce", "all_to_all", "pipeline_p2p")}
    if sum(comm.values()) > 0.2 * plan.step_seconds:
        worst = max(comm, key=comm.get)
        fix = {"dp_reduce": "fewer data-parallel ranks per node-crossing group, or more micro-batches per step",
               "all_to_all": "keep ep inside a node or lower parallel.ep",
               "pipeline_p2p": "fewer pipeline stages or larger micro-batches"}[worst]
        plan.warnings.append(
            f"communication {sum(comm.values()) / plan.step_seconds:.0%} of the step ("
            + ", ".join(f"{k} {v / plan.step_seconds:.0%}" for k, v in comm.items() if v > 0) + f"); {fix}"
        )
    if inp.precision.param_bytes == 4 and inp.mfu is None:
        plan.warnings.append("train.precision=fp32: the efficiencies are bf16 measurements; fp32 matmuls run "
                             "several times slower, so this step time is optimistic")
    if inp.document_mask and inp.mfu is None:
        plan.warnings.append("data.document_mask=true: attention is timed at the causal SDPA rate; FlexAttention's "
                             "document mask ran at about half of it on the H200 check")
    if not inp.compiled:
        plan.warnings.append("train.compile=false: the memory-bound traffic is counted for compiled blocks; eager "
                             "blocks ran 1.31x slower on the H200 check")
    if inp.calibration is not None and _part_of(inp.calibration.device) not in (None, inp.gpu.name):
        plan.warnings.append(f"cluster.calibration was measured on {inp.calibration.device}, but cluster.gpu="
                             f"{inp.gpu.name}: its efficiencies are used as measured")
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


def _part_of(device: str) -> str | None:
    """The planner's part name for a device name bench/gpu.py reports ("NVIDIA H200" -> "h200")."""
    words = device.lower().replace("-", " ").split()
    for part in ("h100", "h200", "a100"):
        if part in words:
            return part
    return None
