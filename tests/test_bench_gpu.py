"""bench/gpu.py --smoke: every section of the GPU check runs at tiny shapes on CPU and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("versions", "stack", "profile", "sdpa", "grouped_gemm", "dispatcher", "compile", "train")


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "JETMOE_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed_sections"] == []
    for name in SECTIONS:
        assert name in result and "error" not in result[name], name
    assert result["profile"]["host_syncs_per_block"] == 0
    assert sum(result["profile"]["bucket_ms"].values()) > 0
    assert all(r["tokens_per_s"] > 0 for r in result["stack"]["rows"])
    assert result["grouped_gemm"]["one_empty"]["empty_expert_grad_is_zero"]
    for mode in result["dispatcher"].values():
        assert mode["moe_layer_bitwise_equal"] and mode["block_bitwise_equal"], mode
    assert result["train"]["loss_fell"]
    assert "resume_error" not in result["train"] and result["train"]["checkpoint_blocking_s"] >= 0, result["train"]
