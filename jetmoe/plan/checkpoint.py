"""Checkpoint size and write time: every rank writes its own part (fp32 weights + two fp32 Adam moments),
so a save takes as long as the busiest node needs to push its ranks' parts at cluster.storage_gbps."""

from dataclasses import dataclass

from jetmoe.plan.layout import ClusterLayout, StageParams

BYTES_PER_PARAM = 12  # fp32 weight + exp_avg + exp_avg_sq


@dataclass(frozen=True)
class CheckpointPlan:
    total_bytes: int
    per_rank_bytes: list[int]  # one per stage (each of its dp ranks writes about this much)
    write_seconds: float  # busiest node's bytes / storage bandwidth per node
    storage_gbps: float

    @property
    def max_rank_bytes(self) -> int:
        return max(self.per_rank_bytes)


def checkpoint_plan(stages: list[StageParams], lay: ClusterLayout, tied_embedding: int, storage_gbps: float) -> CheckpointPlan:
    """tied_embedding: parameters of the embedding the last stage holds again for the head (not saved twice)."""
    stage_bytes = [BYTES_PER_PARAM * (s.total - (tied_embedding if s.stage == lay.pp - 1 and lay.pp > 1 else 0))
                   for s in stages]
    per_rank = [b // lay.dp for b in stage_bytes]
    nodes: dict[int, int] = {}
    for rank in range(lay.gpus):
        node = rank // lay.gpus_per_node
        nodes[node] = nodes.get(node, 0) + per_rank[rank // lay.dp]
    seconds = max(nodes.values()) / (storage_gbps * 1e9) if storage_gbps > 0 else float("inf")
    return CheckpointPlan(sum(stage_bytes), per_rank, seconds, storage_gbps)
