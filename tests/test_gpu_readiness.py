"""What the first GPU run depends on and a CPU can still check: which grouped-matmul kernel each device takes,
cuBLAS's deterministic workspace set before any CUDA work, and pipeline stages built on their device in the
run's dtype with transformers' exact initial weights."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetmoe.model.experts import grouped_mm_path
from jetmoe.training import trainer as trainer_module
from jetmoe.training.determinism import set_deterministic

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("device,dtype,capability,path", [
    ("cuda", torch.bfloat16, (9, 0), "grouped"),  # H100, H200: CUTLASS, offsets read on the device
    ("cuda", torch.bfloat16, (10, 0), "grouped"),  # B200
    ("cuda", torch.bfloat16, (8, 0), "loop"),  # A100: torch would loop with a host sync per call
    ("cuda", torch.bfloat16, (8, 9), "loop"),
    ("cuda", torch.bfloat16, (12, 0), "loop"),
    ("cuda", torch.float32, (9, 0), "loop"),  # fp32 on CUDA: torch's per-call-syncing loop
    ("cpu", torch.float32, None, "grouped"),
    ("cpu", torch.bfloat16, None, "grouped"),
    ("cpu", torch.int32, None, "loop"),
])
def test_grouped_matmul_path_by_device(device, dtype, capability, path):
    assert grouped_mm_path(device, dtype, capability) == path


class _Stop(Exception):
    pass


def test_deterministic_workspace_is_set_before_the_process_group_touches_cuda(tmp_path, monkeypatch, run_config):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = {}

    def first_device_work(*args, **kwargs):
        seen["workspace"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        seen["deterministic"] = torch.are_deterministic_algorithms_enabled()
        raise _Stop

    monkeypatch.setattr(trainer_module, "init_process_group", first_device_work)
    cfg = run_config("train.deterministic=true", "logging.wandb.mode=disabled")
    try:
        with pytest.raises(_Stop):
            trainer_module.Trainer(cfg, tmp_path).setup()
    finally:
        set_deterministic(False)
    assert seen == {"workspace": ":4096:8", "deterministic": True}


@pytest.mark.slow
def test_stage_is_built_on_its_device_in_the_run_dtype_with_transformers_weights():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(REPO / "tests/helpers/stage_build_check.py")], capture_output=True,
                         text=True, timeout=300, env=env, cwd=REPO)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 4  # tied and untied embeddings, fp32 and bf16
    for row in rows:
        assert row["mismatched"] == [], row
        assert row["devices"] == ["cpu"] and row["dtypes"] == [row["dtype"]], row


@pytest.mark.parametrize("capability,first", [((9, 0), "CUDNN_ATTENTION"), ((10, 0), "CUDNN_ATTENTION"),
                                              ((8, 0), "FLASH_ATTENTION")])
def test_the_attention_kernel_is_chosen_explicitly_with_every_backend_kept_as_a_fallback(capability, first):
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

    from jetmoe.parallel.attention_backend import describe, sdpa_order, sdpa_priority

    order = sdpa_order(capability)
    assert order[0] == first and sorted(order) == sorted(("CUDNN_ATTENTION", "FLASH_ATTENTION",
                                                          "EFFICIENT_ATTENTION", "MATH"))
    before = _cur_sdpa_kernel_backends(with_priority=True)
    with sdpa_priority(capability):
        assert _cur_sdpa_kernel_backends(with_priority=True)[:4] == [getattr(SDPBackend, n) for n in order]
    assert _cur_sdpa_kernel_backends(with_priority=True) == before  # restored on exit
    assert describe(capability).startswith("attention: SDPA ")
