"""Slow ranks: every `logging.straggler_every` steps each rank's compute and wait time of that step, and its host.

Each pipeline instruction DeepSpeed runs is timed (jetmoe.parallel.deepspeed_internals.time_pipeline_instructions):
forward, backward and the optimizer step count as compute; receives, sends and gradient reductions as waiting
(a rank that waits is waiting for someone else). On a measured step a CUDA rank synchronises after each
instruction, so the times are the device's; other steps only read the clock. After the measured step one
all-gather of two numbers per rank; a rank whose compute exceeds the median over all ranks by
`logging.straggler_factor` is named on the console (host and rank) and in the metrics row (`stragglers`).
The median is over all ranks: stages are balanced by parallel.partition, and a median of a stage's dp peers alone
could not single out one of two.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
import torch.distributed as dist

from jetmoe.log import get_logger
from jetmoe.parallel.deepspeed_internals import time_pipeline_instructions

logger = get_logger(__name__)
COMPUTE = ("ForwardPass", "BackwardPass", "OptimizerStep")
WAIT = ("RecvActivation", "RecvGrad", "SendActivation", "SendGrad", "ReduceGrads", "ReduceTiedGrads")


class StragglerWatch:
    def __init__(self, every: int, factor: float, cuda: bool):
        self.every, self.factor, self.cuda = every, factor, cuda
        self.measuring = False
        self.compute_s = self.wait_s = 0.0
        self.hosts: list[str] = []

    def attach(self, engine) -> None:
        """Time the engine's instructions; learn every rank's host name (once, at set-up)."""
        time_pipeline_instructions(engine, self._report)
        host = socket.gethostname()
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.hosts = [None] * dist.get_world_size()
            dist.all_gather_object(self.hosts, host)
        else:
            self.hosts = [host]

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def start(self, step: int) -> None:
        """Before optimizer step `step` runs."""
        self.measuring = self.due(step)
        self.compute_s = self.wait_s = 0.0

    def _report(self, name: str, start: float) -> None:
        if not self.measuring:
            return
        if self.cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if name in COMPUTE:
            self.compute_s += seconds
        elif name in WAIT:
            self.wait_s += seconds

    def finish(self, step: int, device) -> dict:
        """After the step (every rank calls it): on a measured step, the metrics fields, and the console line for
        each slow rank."""
        if not self.measuring:
            return {}
        self.measuring = False
        mine = torch.tensor([self.compute_s, self.wait_s], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            times = torch.stack(every).cpu()
        else:
            times = mine.cpu()[None]
        return self.judge(times, step)

    def judge(self, times: torch.Tensor, step: int) -> dict:
        """times [ranks, (compute, wait)] -> the row's fields; a warning per slow rank."""
        compute = times[:, 0]
        median = statistics.median(compute.tolist())
        slow = [r for r in range(len(compute)) if median > 0 and float(compute[r]) > self.factor * median]
        for r in slow:
            logger.warning(f"slow rank {r} on host {self.hosts[r]} at step {step}: compute {float(compute[r]):.3f} s, "
                           f"{float(compute[r]) / median:.1f}x the median {median:.3f} s over {len(compute)} ranks")
        return {
            "compute_s_median": round(median, 6),
            "compute_s_max": round(float(compute.max()), 6),
            "wait_s_max": round(float(times[:, 1].max()), 6),
            "stragglers": [{"rank": r, "host": self.hosts[r], "compute_s": round(float(compute[r]), 6),
                            "wait_s": round(float(times[r, 1]), 6)} for r in slow],
        }
