"""Each stage's seconds per micro-batch and per step: its work at the GPU's efficiencies, its sweeps at the
measured per-parameter rates, its communication on the links the layout places it on."""

from math import ceil

from jetmoe.plan.engine_model import EngineBehaviour
from jetmoe.plan.hardware import ACCUMULATION_SWEEP_BYTES_PER_PARAM, GPU, Efficiencies
from jetmoe.plan.layout import ClusterLayout, StageParams
from jetmoe.plan.params import ModelShape, ParamCounts
from jetmoe.plan.step import StageCost
from jetmoe.plan.traffic import StageTraffic
from jetmoe.plan.work import counted_flops, stage_work


def stage_costs(shape: ModelShape, counts: ParamCounts, stages: list[StageParams], traffic: list[StageTraffic],
                lay: ClusterLayout, gpu: GPU, eff: Efficiencies, engine: EngineBehaviour, micro_batch: int, seq: int,
                micro_batches: int, act_bytes: int, bf16: bool, recompute: bool,
                mfu: float | None = None) -> list[StageCost]:
    """mfu (cluster.mfu): when set, a stage computes its MFU-convention FLOPs at mfu x peak instead of its
    work at the measured efficiencies; every other cost is counted as without it."""
    tokens = micro_batch * seq
    accumulation_bytes = engine.grad_accumulation_bytes_per_param if bf16 else engine.fp32_grad_accumulation_bytes_per_param
    expert_bytes, syncs_per_block = accumulation_bytes, 0
    if bf16 and engine.expert_grad_accumulation_bytes_per_param is not None:
        expert_bytes = engine.expert_grad_accumulation_bytes_per_param
        syncs_per_block = engine.fused_backward_syncs_per_block
    # the rate of such sweeps, from the measured one (ns per parameter for ACCUMULATION_SWEEP_BYTES_PER_PARAM)
    sweep_seconds_per_byte = eff.grad_accumulation_ns_per_param * 1e-9 / ACCUMULATION_SWEEP_BYTES_PER_PARAM
    out = []
    for s, t in zip(stages, traffic):
        first, last = s.stage == 0, s.stage == lay.pp - 1
        if mfu is None:
            compute = stage_work(shape, s.blocks, first, last, tokens, seq, act_bytes, recompute, engine, lay.ep,
                                 lay.ep_attention).seconds(eff)
        else:
            compute = counted_flops(shape, counts, s.blocks, last, tokens, seq) / (gpu.peak_tflops * 1e12 * mfu)
        sends = sum(x.seconds(gpu) for x in t.transfers if x.category == "pp" and x.op == "send")
        tied = sum(x.seconds(gpu) for x in t.transfers if x.category == "pp" and x.op != "send")
        shard = ceil(s.dense / lay.dp) + ceil(s.expert_per_rank / lay.expert_dp)
        optimizer = (shard * eff.optimizer_ns_per_param * 1e-9
                     + s.per_rank * engine.optimizer_full_sweep_bytes_per_param / (eff.hbm_gbps * 1e9))
        out.append(StageCost(
            compute=compute,
            grad_accumulation=(s.dense * accumulation_bytes + s.expert_per_rank * expert_bytes) * sweep_seconds_per_byte,
            all_to_all=sum(x.seconds(gpu) for x in t.transfers if x.category == "ep") / micro_batches,
            pipeline_p2p=sends / micro_batches,
            engine_overhead=engine.engine_overhead_s_per_micro_batch + s.blocks * syncs_per_block * engine.host_sync_idle_s,
            dp_reduce=tied + sum(x.seconds(gpu) for x in t.transfers if x.category == "dp"),
            optimizer=optimizer,
        ))
    return out
