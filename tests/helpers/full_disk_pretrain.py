"""train/pretrain.py on a run directory whose disk fills up (for the full-disk test; never used in production).

JETMOE_TEST_FULL_DISK_STEP=s: from the row of step s on, metrics.jsonl's writes, flushes and close raise
OSError(ENOSPC), as on a full filesystem; checkpoint.dir keeps its space."""

import errno
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.training import cli, metrics  # noqa: E402

FULL_AT = int(os.environ["JETMOE_TEST_FULL_DISK_STEP"])


class FullDisk:
    def __init__(self, file) -> None:
        self.file, self.full = file, False

    def _enospc(self):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(self, text: str) -> int:
        if json.loads(text)["step"] >= FULL_AT:
            self.full = True
        if self.full:
            raise self._enospc()
        return self.file.write(text)

    def flush(self) -> None:
        if self.full:
            raise self._enospc()
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.full:
            raise self._enospc()


real_set_start = metrics.MetricsLogger.set_start


def set_start(self, step):
    real_set_start(self, step)
    if self.file is not None:
        self.file = FullDisk(self.file)


metrics.MetricsLogger.set_start = set_start

if __name__ == "__main__":
    cli.main()
