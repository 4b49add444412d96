"""launch/torchrun.sh: multi-node c10d rendezvous, tested as two "nodes" on loopback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import ROOT, TINY_RUN, free_port, metrics  # noqa: E402


def launch_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)


@pytest.mark.slow
def test_two_nodes_on_loopback_train_one_pipeline(tmp_path):
    """Two launch/torchrun.sh "nodes" (one process each) meet at MASTER_ADDR:MASTER_PORT and train a
    2-stage pipeline whose stages live on different nodes."""
    run_dir = tmp_path / "run"
    port = str(free_port())
    procs = []
    for node_rank in (1, 0):  # the non-host node first: it must wait for the rendezvous host
        env = launch_env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                         NPROC_PER_NODE="1", RDZV_ID=f"test-{port}")
        procs.append(subprocess.Popen(
            [str(ROOT / "launch/torchrun.sh"), "parallel.pp=2", "train.max_steps=2", f"hydra.run.dir={run_dir}",
             *TINY_RUN],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    assert any("layout world=2 pp=2 dp=1" in log for log in logs), "\n".join(logs)[-3000:]
    rows = metrics(run_dir)
    assert sorted(rows) == [1, 2]
    assert all(r["lm_loss"] > 0 for r in rows.values())


@pytest.mark.parametrize("env,message", [
    ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2 must be below NNODES=2"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two' is not a number"),
])
@pytest.mark.slow
def test_torchrun_sh_rejects_bad_environment(env, message):
    out = subprocess.run([str(ROOT / "launch/torchrun.sh")], env=launch_env(**env), capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    assert message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_deepspeed_sh_runs_the_trainer_locally(tmp_path):
    """launch/deepspeed.sh without a hostfile: the deepspeed launcher on this node (it appends
    --local_rank=N, which pretrain.py removes before Hydra parses)."""
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [str(ROOT / "launch/deepspeed.sh"), "train.max_steps=1", f"hydra.run.dir={run_dir}", *TINY_RUN],
        cwd=tmp_path, env=launch_env(NPROC_PER_NODE="1", MASTER_PORT=str(free_port())), capture_output=True,
        text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "--local_rank=0" in out.stdout + out.stderr  # the launcher really passed it
    assert sorted(metrics(run_dir)) == [1]
