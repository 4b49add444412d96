"""Non-finite steps named at their source (issue 24 part 2): an Inf injected in one block's MoE experts at pp=3
(tests/helpers/inf_expert_pretrain.py) is named, block and rank, in the error line and the metrics row."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.launch_util import ROOT, TINY_RUN, free_port, metrics
from jetmoe.training.nonfinite_trace import describe, sentence


def test_module_names_read_as_stage_parts():
    assert describe("model.layers.4.mlp.output_linear") == "block 4 MoE experts (output_linear)"
    assert describe("model.layers.0.self_attention.experts.router") == "block 0 MoA experts router"
    assert describe("model.layers.2.mlp.router") == "block 2 MoE router"
    assert describe("model.embed_tokens") == "embedding"
    assert "finite" in sentence(None)


@pytest.mark.slow
def test_an_inf_in_one_blocks_experts_at_pp3_is_named_with_its_block_and_rank(tmp_path):
    block = 3  # of 6: a middle stage's
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_TEST_INF_BLOCK": str(block), "JETMOE_TEST_INF_STEP": "2"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "tests/helpers/inf_expert_pretrain.py"), "parallel=pp3",
           *TINY_RUN, "logging.wandb.mode=disabled", "train.max_steps=3", "train.max_skipped_steps=1",
           f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0, out.stdout[-3000:] + out.stderr[-3000:]
    holder = int((run_dir / "inf_rank").read_text())
    ours = [line for line in out.stderr.splitlines() if line.startswith("error")]
    assert len(ours) == 1, out.stderr[-3000:]
    assert f"block {block} MoE experts (output_linear)" in ours[0] and f"rank {holder} " in ours[0], ours[0]
    row = metrics(run_dir)[2]
    assert row["skipped"] and row["nonfinite"]["module"] == f"model.layers.{block}.mlp.output_linear"
    assert row["nonfinite"]["rank"] == holder and row["nonfinite"]["what"] == "output"
    assert not metrics(run_dir)[1]["skipped"] and "nonfinite" not in metrics(run_dir)[1]
