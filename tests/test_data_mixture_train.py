"""data=mixture through the real entry points: train/pretokenize.py fills the sharded cache, then
train/pretrain.py trains two sources in two phases. Checks the per-step shares of tokens_by_source against
the phase weights, eval_loss_by_source, exact resume exactly at the phase boundary, and pp=3 x dp=2 under
torchrun giving the same losses as one process (the same global batches)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.data_corpus import tokenizer_file
from helpers.data_mixture import mixture_overrides
from helpers.launch_util import free_port, metrics
from helpers.trainer_small import SMALL

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = Path(__file__).resolve().parents[1]
G, SEQ = 8, 32  # trainer_small's global batch and sequence length


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    overrides = mixture_overrides(tmp_path_factory.mktemp("mixture"), tokenizer_file(tmp_path_factory))
    proc = subprocess.run([sys.executable, "train/pretokenize.py", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return overrides


def _train(run_dir: Path, overrides: list[str], *extra: str, nproc: int = 1) -> dict[int, dict]:
    args = [*SMALL, *overrides, "train.max_steps=4", "train.eval_every=2", f"hydra.run.dir={run_dir}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "train/pretrain.py", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "train/pretrain.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return metrics(run_dir)


def test_two_phase_mixture_trains_resumes_at_the_boundary_and_matches_pp3_dp2(mixture, tmp_path):
    rows = _train(tmp_path / "whole", mixture)
    assert sorted(rows) == [1, 2, 3, 4]
    previous = {"web": 0, "code": 0}
    for step, row in rows.items():
        by_source = row["tokens_by_source"]
        assert sum(by_source.values()) == row["tokens"] == step * G * SEQ
        share = {k: (by_source[k] - previous[k]) / (G * SEQ) for k in by_source}
        want = {"web": 0.75, "code": 0.25} if step <= 2 else {"web": 0.5, "code": 0.5}
        for k in want:  # within one sample of weight x batch
            assert abs(share[k] - want[k]) <= 1 / G, (step, share)
        previous = by_source
    for step in (2, 4):
        per_source = rows[step]["eval_loss_by_source"]
        assert sorted(per_source) == ["code", "web"] and all(math.isfinite(v) for v in per_source.values())
        assert per_source["code"] != per_source["web"]  # really evaluated per domain

    # stopped exactly at the phase boundary (2 steps done), then resumed: the same steps 3 and 4
    resumed_dir = tmp_path / "resumed"
    _train(resumed_dir, mixture, "train.max_steps=2", "checkpoint.every=2")
    resumed = _train(resumed_dir, mixture, "checkpoint.every=2")
    for step in (3, 4):
        for key in ("lm_loss", "aux_loss"):
            assert resumed[step][key] == rows[step][key], (step, key)
        assert resumed[step]["tokens_by_source"] == rows[step]["tokens_by_source"]

    pp3_dp2 = _train(tmp_path / "pp3_dp2", mixture, "parallel.pp=3", nproc=6)
    for step in rows:
        assert pp3_dp2[step]["tokens_by_source"] == rows[step]["tokens_by_source"]
        assert math.isclose(pp3_dp2[step]["lm_loss"], rows[step]["lm_loss"], rel_tol=1e-5), step
