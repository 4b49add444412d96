"""train/pretrain.py with one rank slowed on purpose, for the straggler test (never used in production).

JETMOE_TEST_SLOW_RANK=r, JETMOE_TEST_SLOW_S=s: global rank r sleeps s seconds in each block's forward."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.parallel import pipeline  # noqa: E402
from jetmoe.training import cli  # noqa: E402

if os.environ.get("RANK", "0") == os.environ.get("JETMOE_TEST_SLOW_RANK"):
    pause = float(os.environ.get("JETMOE_TEST_SLOW_S", "1"))
    real_forward = pipeline.BlockStage.forward

    def forward(self, inputs):
        time.sleep(pause)
        return real_forward(self, inputs)

    pipeline.BlockStage.forward = forward

if __name__ == "__main__":
    cli.main()
