"""Where parameters live: blocks per pipeline stage and parameters held by one rank of a stage."""

from dataclasses import dataclass
from typing import Any

from jetmoe.plan.params import ModelShape, ParamCounts


@dataclass(frozen=True)
class ClusterLayout:
    """The planner's view of a layout: a whole cluster, not one rank (that is jetmoe.parallel.topology.Layout)."""

    gpus: int
    pp: int
    ep: int
    ep_attention: bool  # MoA experts sharded over ep too (else only MoE experts are)
    gpus_per_node: int
    partition: Any = "uniform"  # uniform | parameters | [blocks on stage 0, ...] (parallel.partition)

    @property
    def dp(self) -> int:
        return self.gpus // self.pp

    @property
    def expert_dp(self) -> int:
        """Ranks holding the same experts of a stage: the group that reduces (and ZeRO-shards) expert state."""
        return self.dp // self.ep


def blocks_per_stage(num_layers: int, pp: int, partition: Any = "uniform", block: int = 1, first: int = 0,
                     last: int = 0) -> list[int]:
    """Blocks on each stage, split exactly as the trainer splits them (jetmoe.parallel.topology); a balancing
    partition weighs the embedding on the first block and the norm/head on the last."""
    from jetmoe.parallel.topology import split_blocks  # pure Python, no torch

    weights = [block] * num_layers
    weights[0] += first
    weights[-1] += last
    return split_blocks(num_layers, pp, partition, weights)


def balance_weights(shape: ModelShape, counts: ParamCounts, balances: str, seq: int) -> tuple[int, int, int]:
    """(block, first, last) weights of a balancing partition: parameters (the trainer's parallel.partition=parameters
    today: parallel/pipeline.py block_weights) or FLOPs per token (the head's matmul on the last stage, the
    embedding's lookup free)."""
    b = counts.block
    if balances == "flops":
        block = 6 * (b.dense + b.expert * shape.top_k // shape.num_experts) + 6 * seq * shape.attn_size * shape.top_k
        return block, 0, 6 * (counts.embedding + counts.final_norm)
    last = counts.final_norm + (counts.head if not shape.tied else counts.embedding)
    return b.total, counts.embedding, last


@dataclass(frozen=True)
class StageParams:
    stage: int
    blocks: int
    dense: int  # held whole by every rank of the stage
    expert_per_rank: int  # this rank's experts (1/ep of the sharded ones)
    expert_total: int  # all experts of the stage

    @property
    def per_rank(self) -> int:
        return self.dense + self.expert_per_rank

    @property
    def total(self) -> int:
        return self.dense + self.expert_total


def stage_params(shape: ModelShape, counts: ParamCounts, layout: ClusterLayout, balances: str = "parameters",
                 seq: int = 1) -> list[StageParams]:
    """Parameters per stage. With pp > 1 and tied embeddings the last stage keeps its own copy of the
    embedding for the head (DeepSpeed's tied layers), so the tied weight is held twice. `balances`: what a
    balancing partition weighs (engine_model.EngineBehaviour.partition_balances)."""
    out = []
    b = counts.block
    sharded = b.expert if layout.ep_attention else b.expert - b.expert_attention
    unsharded = b.expert - sharded
    last_extra = counts.final_norm + (counts.head if not shape.tied else (counts.embedding if layout.pp > 1 else 0))
    if layout.partition == "flops":  # a partition that names what it balances
        balances = "flops"
    blocks = blocks_per_stage(shape.num_layers, layout.pp, layout.partition,
                              *balance_weights(shape, counts, balances, seq))
    for s, n in enumerate(blocks):
        dense = n * b.dense
        if s == 0:
            dense += counts.embedding
        if s == layout.pp - 1:
            dense += last_extra
        out.append(
            StageParams(
                stage=s,
                blocks=n,
                dense=dense,
                expert_per_rank=n * (sharded // layout.ep + unsharded),
                expert_total=n * b.expert,
            )
        )
    return out
