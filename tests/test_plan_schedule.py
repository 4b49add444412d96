"""The planner's 1F1B bubble and in-flight counts against DeepSpeed's own TrainSchedule."""

import pytest
from deepspeed.runtime.pipe import schedule as ds

from jetmoe.plan.memory import in_flight, pipe_buffers
from jetmoe.plan.throughput import bubble_fraction, micro_batches_for_bubble


def simulate(micro_batches: int, stages: int, stage: int) -> tuple[float, int]:
    """(idle share of the schedule's slots, most forwards awaiting their backward) for one stage."""
    sched = ds.TrainSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
    busy = total = live = most = 0
    for cmds in sched.steps():
        total += 1
        for c in cmds:
            if isinstance(c, ds.ForwardPass):
                busy, live = busy + 1, live + 1
            elif isinstance(c, ds.BackwardPass):
                busy, live = busy + 1, live - 1
        most = max(most, live)
    return 1 - busy / total, most


@pytest.mark.parametrize("pp,m", [(1, 4), (2, 1), (2, 8), (3, 2), (3, 32), (4, 7), (8, 64)])
def test_bubble_and_in_flight_match_deepspeed(pp, m):
    for stage in range(pp):
        idle, most = simulate(m, pp, stage)
        assert bubble_fraction(pp, m) == pytest.approx(idle)
        assert in_flight(stage, pp, m) == most
        if pp > 1:
            assert pipe_buffers(stage, pp, m) == ds.TrainSchedule(m, pp, stage).num_pipe_buffers()


@pytest.mark.parametrize("pp", [2, 3, 8])
def test_micro_batches_for_bubble_is_the_smallest(pp):
    m = micro_batches_for_bubble(pp, 0.10)
    assert bubble_fraction(pp, m) <= 0.10 < bubble_fraction(pp, m - 1)
