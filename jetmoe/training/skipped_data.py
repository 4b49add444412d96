"""The data a run never trains on: sample ranges of the data stream skipped before each step.

The stream is the sampler's endless sequence of samples; a loader's position is the number of samples consumed
(`consumed_samples`), and a step trains the global batch [position, position + G). Before each step, every global
batch that overlaps a skipped range is passed over whole, so a step's batch is a function of (seed, position,
ranges): every rank and every layout skips the same batches.

Ranges come from `train.spike.skip_samples` and from the run directory's record, `skipped_samples.json`, which
every spike extends and every later launch reads, so a resumed run skips the same batches:

    {"ranges": [[start, end], ...],       passed over (a rollback's window; never loaded again)
     "no_update": [[start, end], ...],    trained without applying the update (policy skip: the step still counts)
     "rollbacks": N,
     "events": [{"policy", "step", "samples", "spike": {...}, "checkpoint_step", "steps", "host", "time"}, ...]}

Rank 0 writes it (atomically); every rank holds the same copy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jetmoe.errors import JetMoEError

RECORD = "skipped_samples.json"


def merge(ranges) -> list[list[int]]:
    """Sorted, non-overlapping [start, end) ranges covering the same samples."""
    out: list[list[int]] = []
    for start, end in sorted((int(a), int(b)) for a, b in ranges):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return out


class SkippedData:
    def __init__(self, run_dir: str | Path, configured, global_batch_size: int, writer: bool):
        """configured: train.spike.skip_samples; writer: this rank writes the record (rank 0)."""
        self.path = Path(run_dir) / RECORD
        self.writer = writer
        self.global_batch_size = global_batch_size
        self.record = {"ranges": [], "no_update": [], "rollbacks": 0, "events": []}
        if self.path.exists():
            try:
                self.record.update(json.loads(self.path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise JetMoEError(f"{self.path} cannot be read ({e}); it lists the data this run skips: fix or "
                                  "delete it (then pass its ranges as train.spike.skip_samples)") from None
        self.configured = merge(configured)
        self.ranges = merge(self.configured + self.record["ranges"])
        self.starts: dict[int, int] = {}  # step -> the stream position its batch started at (this launch)

    @property
    def rollbacks(self) -> int:
        return int(self.record["rollbacks"])

    def skips(self, start: int) -> bool:
        end = start + self.global_batch_size
        return any(a < end and start < b for a, b in self.ranges)

    def advance(self, loader, step: int) -> int:
        """Move the loader past skipped batches before `step` loads its batch; returns the samples passed over."""
        passed = 0
        while self.skips(loader.consumed_samples):
            loader.consumed_samples += self.global_batch_size
            passed += self.global_batch_size
        self.starts[step] = loader.consumed_samples
        return passed

    def no_update(self, start: int) -> bool:
        """The batch at this stream position was a skipped update (policy skip) in an earlier launch."""
        return any(a <= start < b for a, b in self.record["no_update"])

    def batches_of(self, first_step: int, last_step: int) -> list[list[int]]:
        """The sample ranges that steps first..last trained (as recorded by advance)."""
        return merge([self.starts[s], self.starts[s] + self.global_batch_size]
                     for s in range(first_step, last_step + 1) if s in self.starts)

    def add_rollback(self, event: dict) -> None:
        """Pass over `event["samples"]` from now on, count the rollback and write the record (rank 0)."""
        self.record["ranges"] = merge(self.record["ranges"] + event["samples"])
        self.record["rollbacks"] = self.rollbacks + 1
        self.ranges = merge(self.configured + self.record["ranges"])
        self._write(event)

    def add_no_update(self, event: dict) -> None:
        """A step trained without its update (`event["samples"]`: its batch); later launches do the same."""
        self.record["no_update"] = merge(self.record["no_update"] + event["samples"])
        self._write(event)

    def _write(self, event: dict) -> None:
        self.record["events"].append({**event, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if self.writer:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.record, indent=1) + "\n")
            os.replace(tmp, self.path)
