"""Process layout: world = pp x dp, ranks pipe-major and data-minor (DeepSpeed's
PipeModelDataParallelTopology order), ep peers contiguous inside each stage's data-parallel group.

Everything here is arithmetic on the numbers a user chose, checked before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from jetmoe.errors import JetMoEError


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int
    dp: int
    ep: int
    rank: int

    @property
    def stage(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    def describe(self) -> str:
        return f"world={self.world} pp={self.pp} dp={self.dp} ep={self.ep}"

    def as_dict(self) -> dict:
        return {"world": self.world, "pp": self.pp, "dp": self.dp, "ep": self.ep}


Layout.SINGLE = Layout(world=1, pp=1, dp=1, ep=1, rank=0)  # one process holding everything


def make_layout(world: int, rank: int, pp: int, ep: int, num_layers: int, num_experts: int) -> Layout:
    """Validate (world, pp, ep) against the model and name this rank's place in the layout."""
    if pp < 1 or ep < 1:
        raise JetMoEError(f"parallel.pp={pp} and parallel.ep={ep} must be >= 1")
    if world % pp:
        raise JetMoEError(
            f"world size {world} is not divisible by parallel.pp={pp}; launch a multiple of {pp} processes "
            f"or change parallel.pp")
    if pp > num_layers:
        raise JetMoEError(
            f"parallel.pp={pp} exceeds the model's {num_layers} layers; every stage needs at least one block")
    dp = world // pp
    if dp % ep:
        raise JetMoEError(
            f"parallel.ep={ep} does not divide the data-parallel degree dp={dp} (world {world} / pp {pp}); "
            f"choose ep among the divisors of {dp}")
    if num_experts % ep:
        raise JetMoEError(
            f"parallel.ep={ep} does not divide the number of experts {num_experts} (model.num_local_experts)")
    if not 0 <= rank < world:
        raise JetMoEError(f"rank {rank} outside world size {world}")
    return Layout(world=world, pp=pp, dp=dp, ep=ep, rank=rank)


def deepspeed_topology(layout: Layout):
    """DeepSpeed's topology object for this layout (same rank order as `Layout`)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    return PipeDataParallelTopology(num_pp=layout.pp, num_dp=layout.dp)


def split_blocks(num_layers: int, pp: int, partition, block_params: list[int] | None = None) -> list[int]:
    """Number of blocks on each stage.

    partition: "uniform" (as even as possible, earlier stages take the remainder last),
    "parameters" or "flops" (balance `block_params`: one weight per block, parameters or training FLOPs, the
    caller folds the embedding into the first block's and the head into the last block's), or an explicit list
    of per-stage block counts.
    """
    if isinstance(partition, str):
        method = partition.lower()
        if method == "uniform":
            base, extra = divmod(num_layers, pp)
            # Any remainder goes to the later stages.
            return [base + (1 if s >= pp - extra else 0) for s in range(pp)]
        if method in ("parameters", "flops"):
            if block_params is None:
                block_params = [1] * num_layers
            return _balance(block_params, pp)
        raise JetMoEError(
            f"parallel.partition={partition!r} is unknown; use uniform, parameters, flops or a list of blocks per stage")
    counts = [int(c) for c in partition]
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
        raise JetMoEError(
            f"parallel.partition={counts} must list {pp} positive block counts summing to {num_layers} layers")
    return counts


def _balance(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of `weights` into `parts` non-empty pieces minimising the heaviest piece."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    # best[p][i]: minimal max-load splitting the first i items into p pieces
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                load = max(best[p - 1][j], prefix[i] - prefix[j])
                if load < best[p][i]:
                    best[p][i], cut[p][i] = load, j
    counts, i = [], n
    for p in range(parts, 0, -1):
        j = cut[p][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
