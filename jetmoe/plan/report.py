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
    for line in comm_lines(plan):
        add(line)
    add(("bubble", f"{plan.bubble:.1%} of the slots (1F1B, (pp-1)/(m+pp-1))"))
    add(("efficiencies", _efficiencies(i)))
    add(("engine", "; ".join(f"{k}={v}" for k, v in i.engine.rows())))
    unit, scale = _unit(plan.step_seconds)
    add(("step", f"{plan.step_seconds * scale:.3f} {unit} per step, cost by cost (exposed time; the slowest stage "
                 f"is {plan.step.slowest_stage})"))
    for key, seconds in plan.step.parts.items():
        add((f"  {key}", f"{seconds * scale:9.3f} {unit} {seconds / plan.step_seconds:6.1%}"))
    add(("predicted MFU", f"{plan.predicted_mfu:.1%} of {i.gpu.peak_tflops:.0f} TFLOP/s bf16 peak"
         + (f" (cluster.mfu={i.mfu:g} while computing)" if i.mfu is not None else "")))
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


def _unit(seconds: float) -> tuple[str, float]:
    return ("s", 1.0) if seconds >= 0.1 else ("ms", 1e3) if seconds >= 1e-4 else ("us", 1e6)


def seconds_text(seconds: float) -> str:
    unit, scale = _unit(seconds)
    return f"{seconds * scale:.3g} {unit}"


def comm_lines(plan: Plan) -> list[tuple[str, str]]:
    """Per category: what the busiest stage's rank hands its calls in a step, by operation, dtype and link."""
    rows = []
    for category, name in (("dp", "dp reduce"), ("pp", "pipeline"), ("ep", "all-to-all")):
        stage = max(plan.traffic, key=lambda t: t.payload(category))
        items = [t for t in stage.transfers if t.category == category]
        if not items:
            rows.append((name, "none"))
            continue
        rows.append((name, f"{stage.payload(category) / 1e9:.2f} GB per rank per step (stage {stage.stage}), "
                           f"{stage.wire(category) / 1e9:.2f} GB on the wire: " + "; ".join(
                               f"{t.op} {t.what} {t.payload_bytes / 1e9:.2f} GB over {t.group} ranks ({t.link}"
                               f"{', ' + str(t.ranks_per_node) + ' per node' if t.link == 'infiniband' else ''})"
                               for t in items)))
    return rows


def _efficiencies(i) -> str:
    e = i.efficiencies
    return (f"dense GEMM {e.dense_gemm_tflops:.0f}, grouped GEMM {e.grouped_gemm_tflops:.0f}, attention "
            f"{e.attention_tflops:.0f} TFLOP/s; HBM {e.hbm_gbps:.0f} GB/s; accumulation sweep "
            f"{e.grad_accumulation_ns_per_param * 1e3:.2f} ps/param, AdamW {e.optimizer_ns_per_param * 1e3:.1f} "
            f"ps/param ({e.source})")


def json_line(plan: Plan, search: list[dict] | None = None) -> str:
    summary = plan.summary()
    if search is not None:
        summary["search"] = search
    return json.dumps(summary, sort_keys=False)


def _contents(weight_bytes: int) -> str:
    return "fp32 weights + Adam" if weight_bytes == 4 else "bf16 weights + fp32 masters + Adam"


def render_search(candidates: list, top: int, configured: Plan) -> str:
    """The search's ranking (search.Candidate rows), with where the configured layout stands."""
    i = configured.inputs
    head = (f"layouts that fit {i.layout.gpus} x {i.gpu.name} at {i.global_batch} x {i.seq_len} tokens per step, "
            f"fastest first ({len(candidates)} fit; dominant costs besides compute):")
    cols = ("#", "pp", "dp", "ep", "mb", "recompute", "partition", "blocks", "tokens/s", "MFU", "step", "GiB",
            "dominant costs")
    rows = [cols]
    for n, c in enumerate(candidates[:top], 1):
        p = c.plan
        rows.append((str(n), str(c.pp), str(c.dp), str(c.ep), str(c.micro_batch), "on" if c.recompute else "off",
                     c.partition, "/".join(map(str, c.blocks)), _n(p.tokens_per_sec), f"{p.predicted_mfu:.1%}",
                     seconds_text(p.step_seconds), f"{p.peak.peak / GIB:.1f}", c.reason))
    widths = [max(len(r[k]) for r in rows) for k in range(len(cols) - 1)]
    lines = [head] + ["  ".join(v.rjust(w) if k < 5 else v.ljust(w) for k, (v, w) in enumerate(zip(r, widths)))
                      + "  " + r[-1] for r in rows]
    rank = next((n for n, c in enumerate(candidates, 1) if _same(c, configured)), None)
    lines.append(f"the configured layout (pp={i.layout.pp} ep={i.layout.ep} mb={i.micro_batch}) ranks "
                 + (f"{rank} of {len(candidates)}" if rank else "nowhere: it does not fit"))
    return "\n".join(lines)


def _same(candidate, plan: Plan) -> bool:
    i = plan.inputs
    return (candidate.pp, candidate.ep, candidate.micro_batch, candidate.recompute,
            candidate.blocks) == (i.layout.pp, i.layout.ep, i.micro_batch, i.checkpointing,
                                  tuple(s.blocks for s in plan.stages))
