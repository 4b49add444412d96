"""Checkpoint size and write time: every rank writes its own part (weights in the working dtype, two fp32
Adam moments, and in bf16 the fp32 masters too), so a save takes as long as the busiest node needs to push
its ranks' parts at cluster.storage_gbps."""

from dataclasses import dataclass

from jetmoe.plan.layout import ClusterLayout, StageParams

MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32


def bytes_per_param(weight_bytes: int) -> int:
    """Weight file + moments, + the fp32 master when the working copy is not fp32 (rank_files.py)."""
    return weight_bytes + MOMENT_BYTES + (4 if weight_bytes != 4 else 0)


@dataclass(frozen=True)
class CheckpointPlan:
    total_bytes: int
    per_rank_bytes: list[int]  # one per stage (each of its dp ranks writes about this much)
    write_seconds: float  # busiest node's bytes / storage bandwidth per node
    storage_gbps: float

    @property
    def max_rank_bytes(self) -> int:
        return max(self.per_rank_bytes)


def checkpoint_plan(stages: list[StageParams], lay: ClusterLayout, tied_embedding: int, storage_gbps: float,
                    weight_bytes: int = 4) -> CheckpointPlan:
    """tied_embedding: parameters of the embedding the last stage holds again for the head (not saved twice).
    weight_bytes: bytes per parameter of the working copy (4 fp32, 2 bf16)."""
    stage_bytes = [bytes_per_param(weight_bytes) * (s.total - (tied_embedding if s.stage == lay.pp - 1 and lay.pp > 1 else 0))
                   for s in stages]
    per_rank = [b // lay.dp for b in stage_bytes]
    nodes: dict[int, int] = {}
    for rank in range(lay.gpus):
        node = rank // lay.gpus_per_node
        nodes[node] = nodes.get(node, 0) + per_rank[rank // lay.dp]
    seconds = max(nodes.values()) / (storage_gbps * 1e9) if storage_gbps > 0 else float("inf")
    return CheckpointPlan(sum(stage_bytes), per_rank, seconds, storage_gbps)
