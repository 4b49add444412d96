"""Shared bits of the launch/slurm tests: a tiny pipeline run's overrides, metrics reading, waiting."""

import json
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The tiny model, short sequences, 3 micro-batches per step: a few seconds per step on CPU.
TINY_RUN = ["data.seq_len=64", "train.global_batch_size=6", "train.micro_batch_size=2", "logging=quiet",
            "train.eval_every=0", "logging.router_every=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir: Path) -> dict[int, dict]:
    """The last row logged for each step (a resumed run may log a step again)."""
    rows = {}
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return rows


def wait_for(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
