"""Failing loudly: an error on any rank ends the whole job within seconds with that rank's message, and a
stalled step is reported by every rank's watchdog (step, phase, stack) long before the collective timeout.

Faults are injected by tests/helpers/faulty_pretrain.py (train/pretrain.py plus an env-selected fault)."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from helpers.launch_util import ROOT, TINY_RUN, free_port, metrics, wait_for

from jetmoe.training import failures
from jetmoe.training.watchdog import Watchdog


def _start(tmp_path: Path, fault: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "job.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_TEST_FAULT_RANK": "1", "JETMOE_TEST_FAULT": fault,
           "JETMOE_TEST_FAULT_STEP": "2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           str(ROOT / "tests/helpers/faulty_pretrain.py"), "parallel=pp3", *TINY_RUN, "train.max_steps=4",
           "logging.wandb.mode=disabled", f"hydra.run.dir={tmp_path / 'run'}", *overrides]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log


@pytest.mark.slow
def test_an_error_on_rank_1_of_3_stages_ends_the_job_within_60s_with_its_message(tmp_path):
    proc, log = _start(tmp_path, "raise", "parallel.timeout_s=1800")
    try:
        wait_for(lambda: metrics(tmp_path / "run") or proc.poll() is not None, 240, "step 1")
        assert metrics(tmp_path / "run"), log.read_text()[-3000:]  # step 1 trained before the fault
        # rank 1 raises as step 2 starts, which can be before this line runs: the job may already be over
        fault_at = time.monotonic()
        proc.wait(timeout=60)
        ended_after = time.monotonic() - fault_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode != 0 and ended_after < 60, text[-3000:]
    assert "error (rank 1): RuntimeError: injected fault on rank 1 at step 2" in text
    assert "[rank 1] Traceback" in text  # the failing rank's own traceback, labelled
    for peer in (0, 2):  # the peers say why they stop, in one line, with no traceback of their own
        assert f"rank {peer}: stopping because rank 1 failed: RuntimeError: injected fault" in text
    assert "Connection closed by peer" not in text and "Error executing job" not in text


@pytest.mark.slow
def test_a_stalled_step_is_reported_by_every_rank_with_its_stack(tmp_path):
    proc, log = _start(tmp_path, "hang", "train.stall_warn_s=3", "parallel.timeout_s=900")
    try:
        wait_for(lambda: all(f"[rank {r}] stall: no progress for" in log.read_text() for r in range(3))
                 or proc.poll() is not None, 240, "a stall report from every rank")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    text = log.read_text()
    reports = {r: "\n".join(line for line in text.splitlines() if line.startswith(f"[rank {r}] ")) for r in range(3)}
    for r in range(3):
        assert "stall: no progress for" in reports[r] and "in step 2 (train_step)" in reports[r], text[-3000:]
    assert "time.sleep(3600)" in reports[1]  # the stuck rank, in its own code
    for r in (0, 2):  # its neighbours, waiting in the pipeline's point-to-point transfer
        assert "train_batch" in reports[r] and ("recv" in reports[r] or "send" in reports[r]), reports[r]


def _store():
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 2, True, wait_for_workers=False)
    return server, dist.TCPStore("127.0.0.1", port, 2, False)


def test_watchdog_stops_its_rank_when_another_rank_recorded_a_failure():
    server, client = _store()
    said = []
    dog = Watchdog(rank=0, stall_warn_s=0, store=client, poll_s=0.05, on_peer_failure=said.append).start()
    try:
        assert failures._claim(server, 1, "RuntimeError: boom") == (1, "RuntimeError: boom")
        assert failures._claim(server, 2, "RuntimeError: later") == (1, "RuntimeError: boom")  # the first one wins
        wait_for(lambda: said, 5, "the watchdog to notice", poll=0.02)
    finally:
        dog.stop()
    assert said == ["rank 0: stopping because rank 1 failed: RuntimeError: boom"]


def _polls(dog: Watchdog, n: int) -> None:
    """Wait until the watchdog has made `n` more checks."""
    target = dog.polls + n
    wait_for(lambda: dog.polls >= target, 10, f"{n} watchdog checks", poll=0.01)


def test_watchdog_ignores_its_own_failure_record():
    server, client = _store()
    said = []
    dog = Watchdog(rank=1, stall_warn_s=0, store=client, poll_s=0.05, on_peer_failure=said.append).start()
    failures._claim(server, 1, "RuntimeError: mine")
    try:
        _polls(dog, 3)  # checks that read the record
    finally:
        dog.stop()
    assert said == []


def _stalled_here(out: io.StringIO, seconds: float = 0.05) -> None:
    deadline = time.monotonic() + 10
    while "stall:" not in out.getvalue() and time.monotonic() < deadline:  # stalled until reported
        time.sleep(seconds)


def test_stall_report_names_step_phase_and_the_main_thread_stack_once_per_stall():
    out = io.StringIO()
    dog = Watchdog(rank=3, stall_warn_s=0.5, poll_s=0.05, out=out).start()
    try:
        dog.progress(7, "evaluate")
        _stalled_here(out)
        first = out.getvalue()
        dog.progress(8)
        _polls(dog, 2)  # progress again: no new report before another stall_warn_s
        assert out.getvalue() == first
    finally:
        dog.stop()
    assert first.count("stall:") == 1
    head = first.splitlines()[0]
    assert head.startswith("[rank 3] stall: no progress for ") and "s in step 7 (evaluate)" in head
    assert "in _stalled_here" in first and "time.sleep(seconds)" in first
    assert all(line.startswith("[rank 3] ") for line in first.splitlines())
