"""The checkpoint directory is locked like the run directory (issue 21 item 3): two runs with their own run
directories and one checkpoint.dir must not resume from and overwrite each other's checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jetmoe.errors import JetMoEError
from jetmoe.training.run_lock import CHECKPOINTS, LOCK, RunLock, lock_for_job


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_run_on_a_locked_checkpoint_dir_is_refused_naming_the_other_run(tmp_path):
    shared = tmp_path / "shared-checkpoints"
    first = lock_for_job(tmp_path / "run-a", True, checkpoints=shared)
    assert json.loads((shared / CHECKPOINTS.file).read_text())["run_dir"] == str(tmp_path / "run-a")
    with pytest.raises(JetMoEError) as refused:
        lock_for_job(tmp_path / "run-b", True, checkpoints=shared)
    line = str(refused.value)
    assert f"checkpoint directory {shared} is in use by the run in {tmp_path / 'run-a'} (pid {os.getpid()}" in line
    assert "pick another checkpoint.dir" in line and "\n" not in line
    assert not (tmp_path / "run-b" / LOCK).exists()  # the refused run lets go of its run directory
    first.release()
    assert not (shared / CHECKPOINTS.file).exists() and not (tmp_path / "run-a" / LOCK).exists()
    lock_for_job(tmp_path / "run-b", True, checkpoints=shared).release()  # free again once the first ended


def test_a_dead_holder_of_the_checkpoint_dir_is_taken_over(tmp_path):
    shared = tmp_path / "ckpt"
    shared.mkdir()
    import socket

    (shared / CHECKPOINTS.file).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(),
                                                       "run_dir": str(tmp_path / "old")}))
    said = []
    lock = RunLock.acquire(shared, said.append, claim=CHECKPOINTS, run_dir=tmp_path / "new")
    assert "checkpoint directory lock: taking over the lock of the run in" in said[-1] and "process is gone" in said[-1]
    lock.release()


def test_the_run_lock_of_the_run_itself_names_no_run(tmp_path):
    """Its own run directory's lock keeps its message (the run directory is the folder named)."""
    lock = RunLock.acquire(tmp_path)
    with pytest.raises(JetMoEError, match=f"run directory {tmp_path} is in use by pid {os.getpid()} .*hydra.run.dir"):
        RunLock.acquire(tmp_path)
    lock.release()
