#!/usr/bin/env python
"""The GPU check's training launch: `train/pretrain.py [overrides]`, with DeepSpeed's BF16 optimizer timed from
outside, per optimizer step, so the step splits the way the planner splits it:

  grad_accumulation  adding each micro-batch's bf16 gradients into the fp32 sum and clearing them: per micro-batch
                     sweeps (BF16_Optimizer.update_hp_grads, clear_lp_grads) or, with bf16.immediate_grad_update,
                     the per-parameter adds in backward (accumulate_hp_grads_and_remove_lp)
  optimizer          clipping, AdamW on the fp32 masters, the bf16 copy refreshed (BF16_Optimizer.step)
  compute            the rest of the step on the device timeline: forward and backward of every micro-batch, the
                     loss, the host's own work where the device waits for it

Times are CUDA events on a GPU (read one step late, so the timing adds no wait of its own), wall time on the CPU.
One JSON line per optimizer step goes to the file named by $JETMOE_STEP_TIMES.

    JETMOE_STEP_TIMES=steps.jsonl python bench/gpu_train_launch.py model=jetmoe_8b ...
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class StepTimer:
    """Marks on the device timeline around the wrapped methods; totals per optimizer step (one train_batch)."""

    def __init__(self, path: Path, cuda: bool):
        self.path, self.cuda = path, cuda
        self.depth = 0  # only the outermost timed call counts (step() may call clear_lp_grads)
        self.spans: list[tuple[str, object, object]] = []
        self.pending: list[tuple[object, object, list]] = []  # steps whose events are not read yet
        self.step = 0

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def wrap(self, owner, name: str, kind: str) -> None:
        original = getattr(owner, name)
        timer = self

        def timed(*args, **kwargs):
            timer.depth += 1
            start = timer.mark() if timer.depth == 1 else None
            try:
                return original(*args, **kwargs)
            finally:
                timer.depth -= 1
                if start is not None:
                    timer.spans.append((kind, start, timer.mark()))

        setattr(owner, name, timed)

    def wrap_step(self, owner, name: str) -> None:
        original = getattr(owner, name)
        timer = self

        def step(*args, **kwargs):
            start, timer.spans = timer.mark(), []
            result = original(*args, **kwargs)
            timer.pending.append((start, timer.mark(), timer.spans))
            while len(timer.pending) > 1:  # the older step's events are done by now on a busy device
                timer.write(*timer.pending.pop(0))
            return result

        setattr(owner, name, step)

    def write(self, start, end, spans) -> None:
        if self.cuda:
            end.synchronize()
        self.step += 1
        row = {"step": self.step, "step_s": self.seconds(start, end), "grad_accumulation": 0.0, "optimizer": 0.0,
               "accumulation_calls": sum(kind == "grad_accumulation" for kind, _, _ in spans)}
        for kind, a, b in spans:
            row[kind] += self.seconds(a, b)
        row["compute"] = row["step_s"] - row["grad_accumulation"] - row["optimizer"]
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        for pending in self.pending:
            self.write(*pending)
        self.pending = []


def main() -> None:
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.pipe.engine import PipelineEngine

    timer = StepTimer(Path(os.environ["JETMOE_STEP_TIMES"]), torch.cuda.is_available())
    timer.wrap_step(PipelineEngine, "train_batch")
    timer.wrap(BF16_Optimizer, "update_hp_grads", "grad_accumulation")
    timer.wrap(BF16_Optimizer, "accumulate_hp_grads_and_remove_lp", "grad_accumulation")  # immediate update
    timer.wrap(BF16_Optimizer, "clear_lp_grads", "grad_accumulation")
    timer.wrap(BF16_Optimizer, "step", "optimizer")
    sys.argv[0] = str(ROOT / "train" / "pretrain.py")
    from jetmoe.training.cli import main as pretrain

    try:
        pretrain()
    finally:
        timer.flush()


if __name__ == "__main__":
    main()
