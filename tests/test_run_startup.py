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


def _wait_for(path: Path, proc, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert path.exists(), proc.communicate()[1][-3000:] if proc.poll() is not None else f"no {path}"


def _stopped_after_step_1(run_dir: Path) -> None:
    assert max(metrics(run_dir)) == 1
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000001"]
    assert verify(run_dir / "checkpoints" / "step_00000001") == []
    assert not (run_dir / LOCK).exists() and not (run_dir / "checkpoints" / CHECKPOINTS.file).exists()


def test_sigterm_during_start_up_stops_after_the_first_step_with_a_checkpoint(tmp_path):
    """Item 15: a plain launch killed by SIGTERM during start-up printed nothing and left run.lock behind."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(command(run_dir, "train.max_steps=4"), env=env(tmp_path / "cache"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _wait_for(run_dir / LOCK, proc)  # set-up has begun: locks taken, data and engine still to come
        _wait_for(run_dir / "checkpoints" / CHECKPOINTS.file, proc)  # item 3: a real run holds its checkpoint dir
        assert not metrics(run_dir)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and "Traceback" not in out + err, out[-3000:] + err[-3000:]
    assert "SIGTERM received during start-up: the run stops after its first step, with a checkpoint" in out
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM after step 1; checkpoint ")
    _stopped_after_step_1(run_dir)


def test_sigusr1_before_the_workers_exist_under_torchrun_sh_is_not_lost(tmp_path):
    """Item 7: torchrun.sh's agent ignores SIGUSR1 and its workers inherited that until the trainer's handler
    existed, so an early Slurm time-limit warning was dropped and the job trained to the end."""
    run_dir = tmp_path / "run"
    launcher = subprocess.Popen([str(ROOT / "launch/torchrun.sh"), *command(run_dir, "train.max_steps=4")[2:]],
                                env={**env(tmp_path / "cache"), "NPROC_PER_NODE": "1", "PYTHON": sys.executable},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        time.sleep(1.0)  # torchrun's agent is still starting: no training process exists yet
        launcher.send_signal(signal.SIGUSR1)
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0 and "Traceback" not in out + err, out[-3000:] + err[-3000:]
    last = [line for line in (out + err).splitlines() if "resume with:" in line]
    assert len(last) == 1 and last[0].startswith("[launch/torchrun.sh] stopped by SIGUSR1 after step 1"), last
    _stopped_after_step_1(run_dir)
