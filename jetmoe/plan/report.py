"""A plan as a human-readable table, then one JSON line (the last line of train/plan.py's output)."""

import json

from jetmoe.plan.memory import GIB
from jetmoe.plan.planner import Plan


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


def render(plan: Plan) -> str:
    i, lay = plan.inputs, plan.inputs.layout
    rows: list[tuple[str, str]] = []
    add = rows.append
    add(("layout", f"{lay.gpus} x {i.gpu.name}: pp={lay.pp} dp={lay.dp} ep={lay.ep}"
         f"{' (MoA+MoE experts)' if lay.ep > 1 and lay.ep_attention else ' (MoE experts)' if lay.ep > 1 else ''}"))
    add(("batch", f"{i.global_batch} x {i.seq_len} tokens = {_n(plan.tokens_per_step)} tokens/step; "
         f"micro-batch {i.micro_batch}, {plan.micro_batches} micro-batches per step"))
    add(("parameters", f"total {_n(plan.counts.total)}, active per token {_n(plan.counts.active)} "
         f"(non-embedding {_n(plan.counts.non_embedding)})"))
    for s, m in zip(plan.stages, plan.memory):
        add((f"stage {s.stage}", f"{s.blocks} blocks, {_n(s.total)} params, {_n(s.per_rank)} per rank"))
    add(("memory", "per GPU: weights, grads, ZeRO-1 optimizer shard, n micro-batches' activations in flight, "
                   "pipe buffers, optimizer-step temporaries -> peak"))
    for m in plan.memory:
        add((f"  stage {m.stage}",
             f"{_gib(m.weights)}, {_gib(m.grads)}, {_gib(m.optimizer)}, {m.in_flight} x {_gib(m.act_per_micro_batch)}, "
             f"{_gib(m.buffers)}, {_gib(m.step)} -> {_gib(m.peak)}"))
    m0 = plan.memory[0]
    add(("activations", f"per micro-batch, stage 0: {_gib(m0.act_per_micro_batch_full)} without checkpointing, "
         f"{_gib(m0.act_per_micro_batch_ckpt)} with ({'on' if i.checkpointing else 'off'} now)"))
    add(("peak memory", f"{_gib(plan.peak.peak)} (stage {plan.peak.stage}) of {i.gpu.memory_gib:.1f} GiB: "
         f"{'fits' if plan.fits else 'DOES NOT FIT'}"))
    add(("FLOPs/token", f"{_n(plan.flops_dense + plan.flops_attention)} = 6 x active {_n(plan.flops_dense)} "
         f"+ attention {_n(plan.flops_attention)}"))
    add(("all-to-all", f"{plan.a2a_bytes_per_rank / 1e9:.2f} GB per rank per step"))
    add(("pipeline", f"{plan.pipeline_bytes_per_boundary / 1e9:.2f} GB per stage boundary per step"))
    add(("dp reduce", f"{plan.dp_bytes_per_rank / 1e9:.2f} GB per rank per step"))
    add(("bubble", f"{plan.bubble:.1%} (1F1B, (pp-1)/(m+pp-1))"))
    add(("step time", f"{plan.step_seconds:.2f} s at {i.mfu:.0%} MFU while busy "
         f"(peak {i.gpu.peak_tflops:.0f} TFLOP/s bf16); comm estimate {plan.comm_seconds:.2f} s"))
    add(("throughput", f"{_n(plan.tokens_per_sec)} tokens/s, {_n(plan.tokens_per_day)} tokens/day"))
    ck = plan.checkpoint
    add(("checkpoint", f"{ck.total_bytes / 1e9:.1f} GB per save ({_contents(i.precision.param_bytes)}), "
         f"{' / '.join(f'{b / 1e9:.2f}' for b in ck.per_rank_bytes)} GB per rank by stage; "
         f"{ck.write_seconds:.0f} s to write at {ck.storage_gbps:g} GB/s per node"))
    for w in plan.warnings:
        add(("WARNING", w))
    for s in plan.suggestions:
        add(("suggest", s))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def json_line(plan: Plan) -> str:
    return json.dumps(plan.summary(), sort_keys=False)


def _contents(weight_bytes: int) -> str:
    return "fp32 weights + Adam" if weight_bytes == 4 else "bf16 weights + fp32 masters + Adam"
