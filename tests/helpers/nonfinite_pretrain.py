"""train/pretrain.py whose weights turn NaN at one step, for the non-finite stop tests (never used in production).

JETMOE_TEST_NAN_FROM=s: before optimizer step s, one weight of this rank's stage is set to NaN; every step from s
on has a non-finite loss and is skipped (a skipped update leaves the NaN in place), as after a real blow-up."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from jetmoe.training import cli, trainer  # noqa: E402

at_step = int(os.environ["JETMOE_TEST_NAN_FROM"])
real_step = trainer.Trainer.train_step


def train_step(self):
    if self.state.step + 1 == at_step:
        with torch.no_grad():
            next(self.parts.module.parameters()).fill_(float("nan"))
    return real_step(self)


trainer.Trainer.train_step = train_step

if __name__ == "__main__":
    cli.main()
