"""Slow ranks (jetmoe.training.stragglers): the judgement on given times, and one rank of a pp=2 x dp=2 run
slowed on purpose is named, host and rank, and no other."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from jetmoe.training.stragglers import StragglerWatch


def test_a_rank_over_the_factor_times_the_median_is_named_and_no_other(caplog):
    watch = StragglerWatch(every=10, factor=1.5, cuda=False)
    watch.hosts = ["node-a", "node-a", "node-b", "node-b"]
    times = torch.tensor([[1.0, 0.5], [1.1, 0.4], [1.8, 0.1], [1.2, 0.3]], dtype=torch.float64)
    logger = logging.getLogger("jetmoe")
    logger.addHandler(caplog.handler)
    try:
        fields = watch.judge(times, step=20)
    finally:
        logger.removeHandler(caplog.handler)
    assert [s["rank"] for s in fields["stragglers"]] == [2] and fields["stragglers"][0]["host"] == "node-b"
    assert fields["compute_s_median"] == pytest.approx((1.1 + 1.2) / 2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "slow rank 2 on host node-b" in warnings[0]
    assert watch.judge(torch.tensor([[1.0, 0.0], [1.4, 0.0]], dtype=torch.float64), 20)["stragglers"] == []


def test_only_due_steps_are_measured():
    watch = StragglerWatch(every=3, factor=1.5, cuda=False)
    watch.start(2)
    watch._report("ForwardPass", 0.0)
    assert watch.compute_s == 0 and watch.finish(2, "cpu") == {}
    watch.hosts = ["h"]
    watch.start(3)
    watch._report("BackwardPass", 0.0)
    watch._report("RecvActivation", 0.0)
    watch._report("LoadMicroBatch", 0.0)
    assert watch.compute_s > 0 and watch.wait_s > 0
    assert watch.finish(3, "cpu")["stragglers"] == []


@pytest.mark.slow
def test_slowed_rank_of_pp2_dp2_run_is_named(tmp_path):
    from helpers.ckpt_run import FAST, ROOT, env
    from helpers.launch_util import free_port, metrics

    slow_rank = 3  # stage 1 (ranks are pipe-major), data-parallel rank 1
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "tests/helpers/slow_rank_pretrain.py"),
               f"hydra.run.dir={tmp_path / 'run'}", *FAST, "train.micro_batch_size=1", "parallel.pp=2",
               "train.max_steps=2", "logging.straggler_every=2", "logging.straggler_factor=3"]
    run = subprocess.run(command, env={**env(tmp_path / "cache"), "JETMOE_TEST_SLOW_RANK": str(slow_rank),
                                       "JETMOE_TEST_SLOW_S": "1.0"},
                         capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert "stragglers" not in rows[1]
    named = rows[2]["stragglers"]
    assert [s["rank"] for s in named] == [slow_rank], json.dumps(rows[2])
    lines = [l for l in (run.stdout + run.stderr).splitlines() if "slow rank" in l]
    assert len(lines) == 1 and f"slow rank {slow_rank} on host {named[0]['host']}" in lines[0]
