"""The layouts that fit a cluster, ranked by predicted tokens/s (`train/plan.py ... plan.search=true`).

Every combination of pipeline stages, expert parallelism, micro-batch size, activation recompute and partition
that the trainer accepts for this model, batch and cluster is planned with the same cost model as the
configured layout; those whose peak memory fits are ranked, each with its dominant costs as the reason."""

from dataclasses import dataclass, replace

from jetmoe.errors import JetMoEError
from jetmoe.plan.planner import Plan, PlanInputs, make_plan
from jetmoe.plan.report import seconds_text

PARTITIONS = ("uniform", "parameters", "flops")


@dataclass(frozen=True)
class Candidate:
    pp: int
    dp: int
    ep: int
    micro_batch: int
    recompute: bool
    partition: str
    blocks: tuple[int, ...]
    plan: Plan

    @property
    def reason(self) -> str:
        costs = self.plan.step.dominant(3)
        return ", ".join(f"{k} {seconds_text(v)}" for k, v in costs) or "compute only"

    def row(self) -> dict:
        p = self.plan
        return {"pp": self.pp, "dp": self.dp, "ep": self.ep, "micro_batch_size": self.micro_batch,
                "activation_checkpointing": self.recompute, "partition": self.partition, "blocks": list(self.blocks),
                "tokens_per_sec": round(p.tokens_per_sec, 1), "predicted_mfu": round(p.predicted_mfu, 4),
                "step_seconds": round(p.step_seconds, 4), "memory_per_gpu_gib": round(p.peak.peak / 2**30, 2),
                "reason": self.reason}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search_layouts(inp: PlanInputs) -> list[Candidate]:
    """All fitting layouts of `inp`'s model, batch and cluster, fastest first (one entry per distinct split)."""
    shape, gpus = inp.shape, inp.layout.gpus
    found: dict[tuple, Candidate] = {}
    for pp in _divisors(gpus):
        if pp > shape.num_layers:
            continue
        dp = gpus // pp
        for ep in _divisors(dp):
            if shape.num_experts % ep:
                continue
            for mb in _divisors(inp.global_batch // dp) if inp.global_batch % dp == 0 else []:
                for recompute in (False, True):
                    for partition in PARTITIONS if pp > 1 else ("uniform",):
                        layout = replace(inp.layout, pp=pp, ep=ep, partition=partition)
                        trial = replace(inp, layout=layout, micro_batch=mb, checkpointing=recompute)
                        try:
                            plan = make_plan(trial, advise=False)
                        except JetMoEError:  # a partition this trainer does not know, a split it refuses
                            continue
                        if not plan.fits:
                            continue
                        blocks = tuple(s.blocks for s in plan.stages)
                        key = (pp, ep, mb, recompute, blocks)
                        if key not in found:  # partitions that split alike are one layout
                            found[key] = Candidate(pp, dp, ep, mb, recompute, partition, blocks, plan)
    return sorted(found.values(), key=lambda c: -c.plan.tokens_per_sec)
