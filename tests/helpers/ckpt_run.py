"""Run train/pretrain.py (optionally under torchrun) with a tiny, fast config, and read its metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.launch_util import free_port, metrics  # noqa: F401  (metrics: re-exported for the tests)

ROOT = Path(__file__).resolve().parents[2]
FAST = ["train.global_batch_size=4", "train.micro_batch_size=2", "data.seq_len=32", "train.eval_every=0",
        "logging.progress_bar=false", "logging.wandb.mode=disabled", "logging.router_every=0",
        "model.num_hidden_layers=3", "parallel.timeout_s=120", "optim.warmup_steps=2"]


def command(run_dir: Path, *overrides: str, nproc: int = 1, max_restarts: int | None = None) -> list[str]:
    script = [str(ROOT / "train/pretrain.py"), f"hydra.run.dir={run_dir}", *FAST, *overrides]
    if nproc == 1 and max_restarts is None:
        return [sys.executable, *script]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if max_restarts is not None:
        launcher += ["--max-restarts", str(max_restarts), "--monitor-interval", "0.2"]
    return launcher + script


def env(cache_dir: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}


def pretrain(run_dir: Path, *overrides: str, cache_dir: Path, nproc: int = 1, timeout: float = 240):
    run = subprocess.run(command(run_dir, *overrides, nproc=nproc), env=env(cache_dir), capture_output=True,
                         text=True, timeout=timeout, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def workers(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun started."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid != launcher_pid:
                continue
            environ = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(proc.name)
    return found
