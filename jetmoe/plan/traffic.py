"""Every byte a rank sends in a training step, by category (dp, pp, ep), operation, dtype and link.

`step_traffic` is the one count the planner times and that tests/test_plan_traffic.py checks against the bytes a
spy on torch.distributed records in a real run. What it counts (engine_model.EngineBehaviour names the choices):
  dp  after the last micro-batch, the stage's gradients reduced (dense over dp, experts over the expert-data
      group; engine.dp_reduce_op at engine.dp_reduce_bytes per element), then ZeRO-1's all-gather of the updated
      weights (engine.weight_gather_bytes); groups of one rank move nothing
  pp  per micro-batch, the hidden states a stage sends forward and their gradient it sends back, in the compute
      dtype; once per step the tied embedding's gradient, all-reduced between the first and the last stage
  ep  per micro-batch and sparse layer, the token rows of the expert all-to-alls, forward and backward (again
      in recompute): MoE out D and back D, MoA out D, back A, out A, back D (with parallel.ep_attention)
Control messages (losses, norms, flags, expert counts, tensor shapes) are left out: a few bytes each.

`payload_bytes` is what the calls are handed: an all-reduce's tensor, an all-gather's gathered buffer, what a
send or an all-to-all sends (an all-to-all's own share included). `wire_bytes` is what leaves the rank under
the algorithm (ring all-reduce 2(n-1)/n of the payload, all-gather, reduce-scatter and all-to-all (n-1)/n).
"""

from dataclasses import dataclass

from jetmoe.plan.engine_model import ALL_REDUCE, EngineBehaviour
from jetmoe.plan.hardware import CALL_LATENCY_S, GPU, LINK_EFFICIENCY
from jetmoe.plan.layout import ClusterLayout, StageParams
from jetmoe.plan.params import ModelShape

CATEGORIES = ("dp", "pp", "ep")
NVLINK, INFINIBAND = "nvlink", "infiniband"


@dataclass(frozen=True)
class Transfer:
    category: str  # dp | pp | ep
    op: str  # all_reduce | reduce_scatter | all_gather | send | all_to_all
    what: str
    payload_bytes: int  # per rank per step
    group: int  # ranks taking part
    calls: int  # per step
    link: str  # nvlink | infiniband (the slowest link the group crosses)
    ranks_per_node: int  # of the group on one node: they share that node's network cards

    @property
    def wire_bytes(self) -> int:
        n = self.group
        if self.op == ALL_REDUCE:
            return 2 * (n - 1) * self.payload_bytes // n
        if self.op == "send":
            return self.payload_bytes
        return (n - 1) * self.payload_bytes // n

    def seconds(self, gpu: GPU) -> float:
        """Time on the links: a ring over nodes runs at the node's network cards its ranks share (one per GPU),
        never faster than NVLink; an all-to-all or a send across nodes at one card per rank."""
        if self.link == NVLINK:
            bandwidth = gpu.intra_node_gbps
        elif self.op in ("send", "all_to_all"):
            bandwidth = gpu.inter_node_gbps
        else:
            bandwidth = min(gpu.intra_node_gbps, self.ranks_per_node * gpu.inter_node_gbps)
        return self.wire_bytes / (bandwidth * LINK_EFFICIENCY * 1e9) + self.calls * CALL_LATENCY_S[self.link]


@dataclass(frozen=True)
class StageTraffic:
    stage: int
    transfers: tuple[Transfer, ...]

    def payload(self, category: str) -> int:
        return sum(t.payload_bytes for t in self.transfers if t.category == category)

    def wire(self, category: str) -> int:
        return sum(t.wire_bytes for t in self.transfers if t.category == category)


def _placement(ranks: list[int], gpus_per_node: int) -> tuple[str, int]:
    nodes: dict[int, int] = {}
    for r in ranks:
        nodes[r // gpus_per_node] = nodes.get(r // gpus_per_node, 0) + 1
    return (NVLINK if len(nodes) == 1 else INFINIBAND), min(nodes.values())


def _groups(lay: ClusterLayout, stage: int) -> dict[str, list[int]]:
    """Ranks of the groups rank `stage * dp` belongs to (pipe-major, data-minor order; ep peers consecutive)."""
    first = stage * lay.dp
    return {
        "dp": [first + j for j in range(lay.dp)],
        "edp": [first + j * lay.ep for j in range(lay.expert_dp)],
        "ep": [first + j for j in range(lay.ep)],
        "next": [first, first + lay.dp],
        "prev": [first - lay.dp, first],
        "tied": [first % lay.dp, first % lay.dp + (lay.pp - 1) * lay.dp],
    }


def step_traffic(shape: ModelShape, stages: list[StageParams], lay: ClusterLayout, tokens_per_micro_batch: int,
                 micro_batches: int, act_bytes: int, weight_bytes: int, recompute: bool,
                 engine: EngineBehaviour) -> list[StageTraffic]:
    """What one rank of each stage sends in one optimizer step (see the module docstring)."""
    bf16 = weight_bytes == 2
    reduce_bytes = engine.dp_reduce_bytes if bf16 else 4
    gather_bytes = engine.weight_gather_bytes if bf16 else 4
    tied_bytes = engine.tied_reduce_bytes if bf16 else 4
    m, T, k = micro_batches, tokens_per_micro_batch, shape.top_k
    out = []
    for s in stages:
        groups = _groups(lay, s.stage)
        place = {name: _placement(ranks, lay.gpus_per_node) for name, ranks in groups.items()}
        items: list[Transfer] = []

        def add(category, op, what, payload, group_name, group, calls):
            if group > 1 and payload > 0:
                items.append(Transfer(category, op, what, int(payload), group, calls, *place[group_name]))

        dense, expert = s.dense, s.expert_per_rank
        if lay.ep == 1:  # experts are not marked as such (parallel/expert.py): reduced over dp like the rest
            dense, expert = dense + expert, 0
        label = "gradients" if lay.ep == 1 else "dense gradients"
        add("dp", engine.dp_reduce_op, f"{label} ({8 * reduce_bytes}-bit)", dense * reduce_bytes, "dp",
            lay.dp, 1)
        add("dp", engine.dp_reduce_op, f"expert gradients ({8 * reduce_bytes}-bit)", expert * reduce_bytes, "edp",
            lay.expert_dp, 1)
        add("dp", "all_gather", f"updated {label.replace('gradients', 'weights')} ({8 * gather_bytes}-bit)",
            dense * gather_bytes, "dp",
            lay.dp, 1)
        add("dp", "all_gather", f"updated expert weights ({8 * gather_bytes}-bit)", expert * gather_bytes, "edp",
            lay.expert_dp, 1)

        hidden = T * shape.hidden_size * act_bytes
        if s.stage < lay.pp - 1:
            add("pp", "send", "hidden states forward", m * hidden, "next", 2, m)
        if s.stage > 0:
            add("pp", "send", "their gradients back", m * hidden, "prev", 2, m)
        if shape.tied and lay.pp > 1 and s.stage in (0, lay.pp - 1):
            add("pp", ALL_REDUCE, f"tied embedding gradient ({8 * tied_bytes}-bit)",
                shape.vocab_size * shape.hidden_size * tied_bytes, "tied", 2, 1)

        widths = 2 * shape.hidden_size + ((2 * shape.hidden_size + 2 * shape.attn_size) if lay.ep_attention else 0)
        passes = 3 if recompute else 2
        calls = (6 if lay.ep_attention else 2) * passes
        add("ep", "all_to_all", "expert token rows", m * s.blocks * passes * T * k * widths * act_bytes, "ep", lay.ep,
            m * s.blocks * calls)
        out.append(StageTraffic(s.stage, tuple(items)))
    return out
