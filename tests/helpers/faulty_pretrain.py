"""train/pretrain.py with a fault injected on one rank, for the failure tests (never used in production).

JETMOE_TEST_FAULT_RANK=r, JETMOE_TEST_FAULT_STEP=s (default 2), JETMOE_TEST_FAULT=raise|hang|oom: global rank r
raises a RuntimeError, sleeps for an hour, or raises CUDA's out-of-memory error when it starts optimizer step s."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.training import cli, trainer  # noqa: E402

rank = os.environ.get("RANK", "0")
if rank == os.environ.get("JETMOE_TEST_FAULT_RANK"):
    at_step = int(os.environ.get("JETMOE_TEST_FAULT_STEP", "2"))
    kind = os.environ.get("JETMOE_TEST_FAULT", "raise")
    real_step = trainer.Trainer.train_step

    def train_step(self):
        if self.state.step + 1 == at_step:
            if kind == "hang":
                time.sleep(3600)
            if kind == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            raise RuntimeError(f"injected fault on rank {rank} at step {at_step}")
        return real_step(self)

    trainer.Trainer.train_step = train_step

if __name__ == "__main__":
    cli.main()
