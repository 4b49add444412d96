"""train/pretrain.py whose checkpoint writes of one step are slowed on one rank, so a test can kill that rank
while an asynchronous save is in flight (never used in production).

JETMOE_TEST_SLOW_RANK=r, JETMOE_TEST_SLOW_STEP=s, JETMOE_TEST_SLOW_S=seconds: on global rank r, in the first
attempt under torchrun only, every file of checkpoint step s sleeps that long before reaching the disk."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.training import cli  # noqa: E402
from jetmoe.training.checkpoint import store  # noqa: E402

if os.environ.get("RANK") == os.environ.get("JETMOE_TEST_SLOW_RANK") \
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
    marker = f"/.step_{int(os.environ['JETMOE_TEST_SLOW_STEP']):08d}."  # .step_XXXXXXXX.<launch>.partial
    delay = float(os.environ.get("JETMOE_TEST_SLOW_S", "2"))
    real = store.write_bytes

    def write_bytes(path, data, **kw):
        if marker in str(path):
            time.sleep(delay)
        real(path, data, **kw)

    store.write_bytes = write_bytes

if __name__ == "__main__":
    cli.main()
