"""Start-up safety through train/pretrain.py and launch/torchrun.sh on CPU (issue 21 items 3, 7, 15): a checkpoint
directory held by another run is refused, and a stop signal that arrives before training starts is neither lost
nor fatal: the run stops at its first step boundary with a checkpoint and lets go of its locks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.ckpt_run import ROOT, command, env, metrics
from jetmoe.training.checkpoint import list_checkpoints, verify
from jetmoe.training.run_lock import CHECKPOINTS, LOCK

pytestmark = pytest.mark.slow


def user_error(out) -> str:
    """The one line a user error prints (exit 2, no traceback)."""
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), out.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_dir_held_by_another_live_run_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    other = subprocess.Popen(["sleep", "600"])  # stands for the first run, alive on this host
    try:
        import socket

        holder = {"host": socket.gethostname(), "pid": other.pid, "run_dir": str(tmp_path / "run-a")}
        (shared / CHECKPOINTS.file).write_text(json.dumps(holder))
        out = subprocess.run(command(tmp_path / "run-b", "train.max_steps=2", "checkpoint.every=1",
                                     f"checkpoint.dir={shared}"),
                             env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=240, cwd=ROOT)
    finally:
        other.kill()
        other.wait()
    line = user_error(out)
    assert f"checkpoint directory {shared} is in use by the run in {tmp_path / 'run-a'} (pid {other.pid}" in line
    assert sorted(p.name for p in shared.iterdir()) == sorted([CHECKPOINTS.file, CHECKPOINTS.file + ".guard"])
    assert not (tmp_path / "run-b" / LOCK).exists() and not (tmp_path / "run-b" / "metrics.jsonl").exists()
