"""Never lose or confuse a run (issue 16), end to end through train/pretrain.py, train/export_hf.py and
launch/torchrun.sh on CPU: damaged checkpoints are kept and stop an auto resume, one job per run
directory, config.yaml only after every check, Ctrl-C / SIGTERM stop cleanly, up-front value checks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.ckpt_run import ROOT, command, env, metrics, workers
from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import list_checkpoints, verify
from jetmoe.training.run_lock import LOCK, RunLock

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def run(run_dir, *overrides, cache, nproc=1, timeout=240):
    return subprocess.run(command(run_dir, *overrides, nproc=nproc), env=env(cache), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def user_error(out) -> str:
    """The one line a user error prints (exit 2, no traceback)."""
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), out.stderr[-3000:]
    return lines[0]


def torchrun_user_error(out) -> str:
    """Under plain torchrun: our one error line (torchrun adds its own ChildFailedError report), and no
    traceback from our code."""
    assert out.returncode != 0, out.stdout[-3000:] + out.stderr[-3000:]
    ours = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1, out.stderr[-3000:]
    assert f'File "{ROOT / "jetmoe"}' not in out.stderr, out.stderr[-3000:]
    return ours[0]


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 1
    path.write_bytes(bytes(data))


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_every_checkpoint_damaged_stops_and_nothing_damaged_is_deleted(tmp_path, cache):
    # a stale lock of a dead process on this host: taken over with a message
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    first = ok(run(tmp_path, "train.max_steps=3", "checkpoint.every=1", cache=cache))  # keep=2: steps 2 and 3
    assert "run directory lock: taking over the lock of pid" in first.stdout
    assert not (tmp_path / LOCK).exists()  # released at the end
    assert (tmp_path / "configs/launch-1.yaml").read_text().startswith("# launch 1")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003", "step_00000002"]

    for step in (2, 3):
        flip_byte(_ckpt(tmp_path, step) / "model-pp00.safetensors")
    (tmp_path / "checkpoints/latest").write_bytes(os.urandom(64))  # a garbled pointer: fall back to a scan
    damaged = {step: snapshot(_ckpt(tmp_path, step)) for step in (2, 3)}
    config, rows = (tmp_path / "config.yaml").read_text(), (tmp_path / "metrics.jsonl").read_text()

    line = user_error(run(tmp_path, "train.max_steps=6", "checkpoint.every=1", "train.log_every=3", cache=cache))
    assert "every checkpoint" in line and "step_00000003, step_00000002" in line
    assert "checkpoint.resume=none" in line and "checkpoint.resume=PATH" in line
    assert {step: snapshot(_ckpt(tmp_path, step)) for step in (2, 3)} == damaged
    assert (tmp_path / "config.yaml").read_text() == config  # a refused launch leaves the record alone
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert not (tmp_path / "configs/launch-2.yaml").exists() and not (tmp_path / LOCK).exists()

    # starting over on top of them is refused too (issue 21: a fresh start never lands on a run's checkpoints)
    line = user_error(run(tmp_path, "train.max_steps=4", "checkpoint.every=1", "checkpoint.resume=none", cache=cache))
    assert "would start over" in line and "checkpoint.fresh_start=move_aside" in line
    assert {step: snapshot(_ckpt(tmp_path, step)) for step in (2, 3)} == damaged
    # the user's choice: start over with them moved aside, byte for byte, never deleted or counted
    again = ok(run(tmp_path, "train.max_steps=4", "checkpoint.every=1", "checkpoint.resume=none",
                   "checkpoint.fresh_start=move_aside", cache=cache))
    assert "starting over" in again.stdout
    for step in (2, 3):
        assert snapshot(tmp_path / "checkpoints" / "previous-1" / f"step_{step:08d}") == damaged[step]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000003"]
    assert all(verify(p) == [] for p in list_checkpoints(tmp_path / "checkpoints"))
    assert "starting after step 0" in (tmp_path / "configs/launch-2.yaml").read_text()
    assert sorted(metrics(tmp_path)) == [1, 2, 3, 4]
    assert (tmp_path / "previous-1" / "metrics.jsonl").read_text() == rows

    # export reads past a garbled `latest` too
    (tmp_path / "checkpoints/latest").write_bytes(b"\xff\xfe garbage")
    out = subprocess.run([sys.executable, str(ROOT / "train/export_hf.py"), str(tmp_path), str(tmp_path / "hf")],
                         env=env(cache), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "hf/config.json").is_file()


def _commit(root, step, keep=0):
    import torch

    from jetmoe.training.checkpoint import store

    writer = store.CheckpointWriter(root, step, store.LocalComm())
    writer.write_tensors("w.safetensors", {"w": torch.full((64,), float(step))})
    return writer.commit(keep=keep)


def test_prune_counts_only_intact_and_never_drops_the_new_one_or_a_damaged_one(tmp_path):
    from jetmoe.training.checkpoint import folders

    for step in (1, 2, 3, 4):
        _commit(tmp_path, step)
    for step in (2, 4):
        flip_byte(tmp_path / f"step_{step:08d}" / "w.safetensors")
    damaged = {step: snapshot(tmp_path / f"step_{step:08d}") for step in (2, 4)}
    folders._KNOWN.clear()  # a new process: it knows nothing about these folders

    # an explicit resume from step 1, then a save of step 2 with keep=1: the damaged 2 is moved aside, the
    # intact newer 3 stays (newest intact), the new 2 is not pruned at once, 1 goes
    _commit(tmp_path, 2, keep=1)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000002", "step_00000002.damaged", "step_00000003", "step_00000004"]
    assert snapshot(tmp_path / "step_00000002.damaged") == damaged[2]
    assert snapshot(tmp_path / "step_00000004") == damaged[4]  # damaged: neither counted nor deleted
    _commit(tmp_path, 5, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_00000004"]
    assert verify(tmp_path / "step_00000004") != []


def test_pp3_all_damaged_and_a_second_job_in_the_same_directory(tmp_path, cache):
    """Through torchrun with pp=3: the all-damaged stop, then two jobs on one run directory (the first
    through launch/torchrun.sh, stopped with Ctrl-C there, which exits 0 with the resume command)."""
    ok(run(tmp_path, "train.max_steps=2", "checkpoint.every=1", "parallel.pp=3", nproc=3, cache=cache))
    for step in (1, 2):
        flip_byte(_ckpt(tmp_path, step) / "model-pp01.safetensors")
    damaged = {step: snapshot(_ckpt(tmp_path, step)) for step in (1, 2)}
    line = torchrun_user_error(run(tmp_path, "train.max_steps=4", "parallel.pp=3", nproc=3, cache=cache))
    assert "every checkpoint" in line and "step_00000002, step_00000001" in line
    assert {step: snapshot(_ckpt(tmp_path, step)) for step in (1, 2)} == damaged

    job_dir = tmp_path / "shared"
    launcher = subprocess.Popen(
        [str(ROOT / "launch/torchrun.sh"), *command(job_dir, "train.max_steps=100000", "parallel.pp=3")[2:]],
        env={**env(cache), "NPROC_PER_NODE": "3", "PYTHON": sys.executable}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        deadline = time.time() + 180
        while not metrics(job_dir) and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.2)
        assert metrics(job_dir), "the first job logged no step"
        holder = json.loads((job_dir / LOCK).read_text())
        config = (job_dir / "config.yaml").read_text()
        second = run(job_dir, "train.max_steps=100000", "parallel.pp=3", "train.seed=99", nproc=3, cache=cache)
        line = torchrun_user_error(second)
        assert f"is in use by pid {holder['pid']} on {holder['host']}" in line
        assert (job_dir / "config.yaml").read_text() == config
        assert not (job_dir / "configs/launch-2.yaml").exists()
        launcher.send_signal(signal.SIGINT)  # Ctrl-C at the launcher
        out, err = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    last = [line for line in (out + err).splitlines() if "resume with:" in line]
    assert len(last) == 1 and last[0].startswith("[launch/torchrun.sh] stopped by SIGINT after step"), (out + err)[-3000:]
    assert f"launch/torchrun.sh" in last[0] and f"hydra.run.dir={job_dir}" in last[0]
    stopped = max(metrics(job_dir))
    assert [p.name for p in list_checkpoints(job_dir / "checkpoints")][0] == f"step_{stopped:08d}"
    assert verify(_ckpt(job_dir, stopped)) == [] and not (job_dir / LOCK).exists()


def _start(run_dir, cache, *overrides):
    proc = subprocess.Popen(command(run_dir, "train.max_steps=100000", *overrides), env=env(cache),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while not metrics(run_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert metrics(run_dir), proc.communicate()[1][-2000:] if proc.poll() is not None else "no step logged"
    return proc


def test_sigint_checkpoints_and_exits_0_and_a_second_one_exits_at_once(tmp_path, cache):
    proc = _start(tmp_path / "once", cache)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in out + err, out[-2000:] + err[-2000:]
    stopped = max(metrics(tmp_path / "once"))
    assert out.strip().splitlines()[-1].startswith(f"stopped by SIGINT after step {stopped}; checkpoint ")
    assert "resume with: python train/pretrain.py" in out and verify(_ckpt(tmp_path / "once", stopped)) == []
    fingerprint = json.loads((_ckpt(tmp_path / "once", stopped) / "trainer_state.json").read_text())["extra"]
    assert set(fingerprint["data_fingerprint"]) == {"tokenizer", "sources", "id"}

    # resuming onto other data (a smaller slice of the corpus) stops, unless the user says continue
    other = ("data.max_tokens=30000", f"train.max_steps={stopped + 1}")
    line = user_error(run(tmp_path / "once", *other, cache=cache))
    assert "was trained on other data" in line and "tokens" in line and "checkpoint.data_changed=continue" in line
    out = ok(run(tmp_path / "once", *other, "checkpoint.data_changed=continue", cache=cache)).stdout
    assert f"continuing on this data from step {stopped}" in out and "resumed from" in out
    assert max(metrics(tmp_path / "once")) == stopped + 1

    proc = _start(tmp_path / "twice", cache, "train.global_batch_size=64", "train.micro_batch_size=8",
                  "data.seq_len=128")  # steps of a second or more
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # two signals at once would reach Python's handler as one
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err, out[-2000:] + err[-2000:]
    assert "second SIGINT: exiting now" in err


@pytest.mark.parametrize("override,message", [
    ("train.lr=-1e-3", "train.lr=-0.001 must be a finite number >= 0"),
    ("train.lr=nan", "train.lr=nan must be a finite number"),
    ("train.max_steps=0", "train.max_steps=0 must be a finite number >= 1"),
    ("train.eval_every=-1", "train.eval_every=-1 must be"),
    ("optim.grad_clip=-1", "optim.grad_clip=-1.0 must be"),
])
def test_bad_values_are_one_line_before_anything_starts(tmp_path, override, message):
    out = subprocess.run([sys.executable, str(ROOT / "train/pretrain.py"), f"hydra.run.dir={tmp_path / 'run'}",
                          override], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env(tmp_path))
    assert message in user_error(out) and out.stdout == ""
    assert not (tmp_path / "run").exists()


def test_check_values_covers_every_numeric_key():
    import dataclasses

    from jetmoe.training.config import OptimSection, TrainSection

    base = {"train": TrainSection(lr=1e-3, max_steps=1, global_batch_size=2, micro_batch_size=1),
            "optim": OptimSection(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, warmup_steps=0)}
    for section in base.values():
        section.check()
    for section, key, bad in [("optim", "beta1", 1.0), ("optim", "beta2", -0.1), ("optim", "eps", 0.0),
                              ("optim", "weight_decay", -1), ("optim", "warmup_steps", -1),
                              ("train", "global_batch_size", 0), ("train", "lr", float("inf"))]:
        with pytest.raises(JetMoEError, match=f"{section}.{key}="):
            dataclasses.replace(base[section], **{key: bad}).check()


def test_unwritable_run_directory_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, str(ROOT / "train/pretrain.py"), f"hydra.run.dir={blocker / 'run'}"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env(tmp_path))
    assert "is not writable" in user_error(out) and "hydra.run.dir=PATH" in out.stderr


def test_lock_holder_on_another_host_is_named_and_a_requeued_slurm_job_takes_over(tmp_path, monkeypatch):
    said = []
    (tmp_path / LOCK).write_text(json.dumps({"host": "node-elsewhere", "pid": 4242, "slurm_job_id": "77"}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(JetMoEError, match=f"in use by pid 4242 on node-elsewhere.*delete {tmp_path / LOCK}"):
        RunLock.acquire(tmp_path, said.append)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # the same job, requeued onto another node
    lock = RunLock.acquire(tmp_path, said.append)
    assert "the same Slurm job, restarted" in said[-1]
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # a live holder on this host: refused
    with pytest.raises(JetMoEError, match=f"in use by pid {os.getpid()} on {socket.gethostname()}"):
        RunLock.acquire(tmp_path, said.append)
    lock.release()
    assert not (tmp_path / LOCK).exists()


def test_damaged_token_cache_is_named_before_deepspeed_starts(tmp_path):
    cache = tmp_path / "cache"
    ok(run(tmp_path / "first", "train.max_steps=1", cache=cache))
    (tokens,) = cache.glob("tokens/*/tokens.bin")
    tokens.write_bytes(tokens.read_bytes()[:-64])
    out = run(tmp_path / "second", "train.max_steps=1", cache=cache)
    line = user_error(out)
    assert f"token cache {tokens.parent} is damaged" in line and f"delete {tokens.parent}" in line
    assert "DeepSpeed" not in out.stdout  # the user's error is the first and only line


def test_deepspeed_sh_checks_the_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nnode001 slots=8\n\nnode002 slots=abc\n")
    out = subprocess.run([str(ROOT / "launch/deepspeed.sh")], env={**os.environ, "HOSTFILE": str(hostfile)},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == (f"launch/deepspeed.sh: {hostfile}:4: 'node002 slots=abc' is not 'HOST slots=N' "
                                  "(N a positive integer); see launch/hostfile.example")
