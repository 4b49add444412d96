"""The step's time, cost by cost, in exposed seconds that add up to the step.

Each stage repeats one slot per micro-batch: its forward and backward compute, the gradient-accumulation
sweep that follows each backward, its expert all-to-alls and its pipeline sends (DeepSpeed's sends block, so
none of these overlap). Under 1F1B with m micro-batches the pipeline part of the step takes
    (m - 1) x slowest slot + sum over stages of their slot
(the fill and drain pass once through every stage; equal stages give (m + pp - 1) x slot). Then each stage
reduces its gradients, steps its optimizer and gathers the weights; the step ends with the slowest stage.

The breakdown names m x each part of the stages' mean slot, m x (slowest slot - mean slot) as `imbalance`, the
fill and drain as `bubble`, and the exposed tail of the stage that finishes last as `dp_reduce` (+ the tied
embedding's reduction) and `optimizer`.
"""

from dataclasses import dataclass

from jetmoe.plan.engine_model import AFTER_LAST_BACKWARD, DURING_LAST_BACKWARD, EngineBehaviour

KEYS = ("compute", "bubble", "grad_accumulation", "dp_reduce", "all_to_all", "pipeline_p2p", "imbalance",
        "optimizer", "engine_overhead")
BACKWARD_SHARE = 2 / 3  # of a slot's compute: the backward runs two of forward + backward's three matmul passes


@dataclass(frozen=True)
class StageCost:
    """Seconds of one rank of a stage: per micro-batch (the slot's parts) and once per step (the tail)."""

    compute: float
    grad_accumulation: float
    all_to_all: float
    pipeline_p2p: float
    engine_overhead: float
    dp_reduce: float
    optimizer: float

    @property
    def slot(self) -> float:
        return self.compute + self.grad_accumulation + self.all_to_all + self.pipeline_p2p + self.engine_overhead


@dataclass(frozen=True)
class StepBreakdown:
    parts: dict  # KEYS -> exposed seconds
    stages: tuple[StageCost, ...]
    slowest_stage: int

    @property
    def step_seconds(self) -> float:
        return sum(self.parts.values())

    def dominant(self, n: int = 3, skip=("compute",)) -> list[tuple[str, float]]:
        """The largest costs besides those in `skip`, largest first."""
        rest = [(k, v) for k, v in self.parts.items() if k not in skip and v > 0]
        return sorted(rest, key=lambda kv: -kv[1])[:n]


def breakdown(stages: list[StageCost], micro_batches: int, engine: EngineBehaviour) -> StepBreakdown:
    m = micro_batches
    slowest = max(range(len(stages)), key=lambda s: stages[s].slot)
    worst = stages[slowest]

    def mean(part: str) -> float:
        return sum(getattr(s, part) for s in stages) / len(stages)

    pipeline = (m - 1) * worst.slot + sum(s.slot for s in stages)

    def tail(s: int) -> tuple[float, float]:
        """(exposed reduction, exposed optimizer) of stage s: started when its own last backward ends, a stage has
        s backward passes to spare before stage 0's ends; overlapped with that backward, one more."""
        c = stages[s]
        backward = c.compute * BACKWARD_SHARE
        head_start = {AFTER_LAST_BACKWARD: s * backward,
                      DURING_LAST_BACKWARD: (s + 1) * backward}.get(engine.dp_reduce_starts, 0.0)
        reduce = max(0.0, c.dp_reduce - head_start)
        optimizer = max(0.0, c.optimizer - max(0.0, head_start - c.dp_reduce))
        return reduce, optimizer

    last = max(range(len(stages)), key=lambda s: sum(tail(s)))
    reduce, optimizer = tail(last)
    parts = {
        "compute": m * mean("compute"),
        "bubble": pipeline - m * worst.slot,
        "grad_accumulation": m * mean("grad_accumulation"),
        "dp_reduce": reduce,
        "all_to_all": m * mean("all_to_all"),
        "pipeline_p2p": m * mean("pipeline_p2p"),
        "imbalance": m * (worst.slot - mean("slot")),
        "optimizer": optimizer,
        "engine_overhead": m * mean("engine_overhead"),
    }
    return StepBreakdown(parts, tuple(stages), slowest)
