"""Shared bits of the launch/slurm tests: a tiny pipeline run's overrides, metrics reading, waiting."""

import json
import socket
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Three steps of a 3-layer model, small enough to compare losses and parameters exactly across layouts: the
# runs that tests/helpers/*_e2e.py drivers make under torchrun (run_driver).
E2E_STEPS = 3
E2E_RUN = [
    f"train.max_steps={E2E_STEPS}", "train.global_batch_size=4", "train.micro_batch_size=1", "train.eval_every=0",
    "train.seed=3", "data.seq_len=16", "model.hidden_size=32", "model.num_hidden_layers=3",
    "model.num_key_value_heads=2", "model.kv_channels=8", "model.intermediate_size=32",
    "logging.wandb.mode=disabled", "logging.progress_bar=false", "logging.router_every=1",
]
E2E_LOSSES = ("lm_loss", "aux_loss", "balance_loss", "z_loss")


def run_driver(driver: Path, out: Path, world: int, overrides, env: dict, timeout: float) -> str:
    """torchrun `world` processes of a driver script writing into `out`, with E2E_RUN and the overrides;
    returns its output (the run must succeed)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
           f"--master_port={free_port()}", str(driver), str(out), *E2E_RUN, *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


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
