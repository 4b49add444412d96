"""The GPU check (bench/gpu.py) as the device will run it: installed from its wheelhouse into a bare virtual
environment and run at tiny shapes on CPU (--smoke); its wheelhouse for the device (CPython 3.12 manylinux);
and its budget: a section that overruns its deadline is stopped, keeps what it measured, and the rest still run."""

import json
import os
import re
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench")]
SECTIONS = ("versions", "memory", "train", "stack", "grouped_gemm", "sdpa", "profile", "dispatcher", "compile")


def _pins(*lists):
    pins = {}
    for name in lists:
        for line in (ROOT / "bench/wheels" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                package, version = line.split("==")
                pins[re.sub(r"[-_.]+", "_", package).lower()] = version
    return pins


def _wheels(folder: Path) -> dict:
    """{normalised name: (version, python tag, abi tag, platform tag)} of the wheels in folder."""
    out = {}
    for wheel in folder.glob("*.whl"):
        name, version, python, abi, platform = wheel.name[:-4].split("-")[-5:]
        out[name.lower()] = (version, python, abi, platform)
    return out


@pytest.mark.slow
def test_device_wheelhouse_holds_cp312_manylinux_wheels_of_exactly_the_pins(tmp_path):
    run = subprocess.run(["bash", "bench/gpu_wheels.sh", "--out", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PY": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    wheels, pins = _wheels(tmp_path), _pins("device.txt")
    assert {name: v[0] for name, v in wheels.items()} == pins
    for name, (_, python, abi, platform) in wheels.items():
        pure = (python, abi, platform) == ("py3", "none", "any")
        binary = python == "cp312" and abi in ("cp312", "abi3") and all(
            p.startswith("manylinux") and p.endswith("_x86_64") for p in platform.split("."))
        assert pure or binary, (name, python, abi, platform)
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) < 64 * 2**20


@pytest.mark.slow
def test_gpu_check_installs_from_its_wheelhouse_into_a_bare_venv_and_runs_every_section(tmp_path):
    """The closest this machine gets to the device: nothing but torch and the wheelhouse, installed --no-index."""
    house, env_dir = tmp_path / "wheels", tmp_path / "venv"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    run = subprocess.run(["bash", "bench/gpu_wheels.sh", "--python-version", version, "--bare-venv", "--out",
                          str(house)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PY": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    for cmd in ([python, "-m", "pip", "install", "-q", "torch==2.13.0"],  # the CPU build this machine keeps
                [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", *map(str, house.glob("*.whl"))]):
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    out = tmp_path / "check.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", JETMOE_CACHE_DIR=str(tmp_path / "cache"))
    run = subprocess.run([python, "bench/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["failed_sections"] == [] and result["out_of_time_sections"] == [], result
    for name in SECTIONS:
        assert name in result and f"[{name}]" in run.stdout, name
    for module in ("datasets", "wandb", "tensorboard", "transformers"):  # not needed by the check
        assert subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode != 0, module
    assert result["profile"]["host_syncs_per_block"] == 0 and sum(result["profile"]["bucket_ms"].values()) > 0
    assert all(r["tokens_per_s"] > 0 for r in result["stack"]["rows"])
    for case in ("balanced", "skewed_odd", "one_empty"):
        assert result["grouped_gemm"][case]["matches_loop"] and "grouped_ms" in result["grouped_gemm"][case]
    assert result["grouped_gemm"]["one_empty"]["empty_expert_grad_is_zero"]
    fused = result["grouped_gemm"]["fused_fp32_accumulation"]
    assert fused["exact_to_fp32"] and fused["no_bf16_weight_grad"] and fused["fused_ms"] > 0, fused
    for mode in result["dispatcher"].values():
        assert mode["moe_layer_bitwise_equal"] and mode["block_bitwise_equal"], mode
    launch, resume = result["train"]["launch"], result["train"]["resume"]
    assert launch["loss_fell"] and launch["checkpoint_blocking_s"] >= 0, launch
    parts = launch["step_breakdown_s"]
    assert parts["grad_accumulation"] > 0 and parts["optimizer"] > 0 and parts["compute"] > 0, parts
    assert launch["accumulation_calls_per_step"] >= 2  # per micro-batch (2 here): sweeps, or one add per parameter
    assert resume["exit"] == 0 and resume["load_s"] >= 0, resume
    assert result["calibration"]["train_step_breakdown_s"] == parts


def test_a_section_past_its_deadline_is_stopped_keeps_its_numbers_and_the_rest_run(tmp_path, capsys):
    import gpu
    from gpu_env import Env

    ran = []

    def stalls(out, deadline):
        out["measured_before_the_stall"] = 1.0
        time.sleep(60)

    def fails(out, deadline):
        raise ValueError("a broken section")

    def quick(name):
        def run(out, deadline):
            ran.append(name)
            out["seconds_left"] = deadline.left()
        return run

    sections = {name: quick(name) for name in SECTIONS}
    sections.update(memory=stalls, train=fails)
    check = gpu.Check(Env(smoke=True), tmp_path / "check.json", budget_s=20.0, cache_dir=tmp_path)
    t0 = time.monotonic()
    check.run(sections, None)
    assert time.monotonic() - t0 < 20
    result = json.loads((tmp_path / "check.json").read_text())
    assert result["memory"]["measured_before_the_stall"] == 1.0 and "out_of_time" in result["memory"]
    assert result["out_of_time_sections"] == ["memory"] and result["failed_sections"] == ["train"]
    assert "a broken section" in result["train"]["error"]
    assert ran == [s for s in SECTIONS if s not in ("memory", "train")]
    printed = capsys.readouterr().out
    assert "[memory]" in printed and "OUT OF TIME" in printed and "[train]" in printed and "ERROR" in printed


def test_each_section_gets_its_share_plus_what_earlier_ones_left():
    from gpu import section_seconds

    shares = [("a", 10.0), ("b", 20.0), ("c", 30.0)]
    assert section_seconds(shares, 0, 60.0) == 10.0
    assert section_seconds(shares, 1, 55.0) == 25.0  # a left 5 s unused
    assert section_seconds(shares, 2, 5.0) == 5.0  # never past the budget
    assert section_seconds(shares, 0, 0.0) == 0.0


def test_profile_buckets_go_by_aten_op_not_by_kernel_name():
    from gpu_model import op_bucket

    assert op_bucket("aten::_grouped_mm") == "grouped_gemm"
    assert op_bucket("aten::mm") == op_bucket("aten::addmm") == op_bucket("aten::bmm") == "matmul"
    assert op_bucket("aten::_cudnn_attention_backward") == op_bucket("aten::_flash_attention_forward") == "attention"
    assert op_bucket("aten::index_select") == op_bucket("aten::argsort") == "index_sort_scatter"
    assert op_bucket("aten::mul") == op_bucket("aten::copy_") == "elementwise_other"
    assert op_bucket("nvjet_hsh_128x256_64x4_1x2_h_bz_coopA_NNT") == "elementwise_other"  # a kernel is not an op


def test_peak_tflops_by_exact_device_name():
    from gpu_env import peak_bf16_tflops

    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0  # a substring match would have said 989
    assert peak_bf16_tflops("NVIDIA H100 NVL") == 835.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("NVIDIA H100") is None and peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None


def test_a_flex_attention_failure_is_reported_not_timed(monkeypatch):
    import torch
    import torch.nn.attention.flex_attention as flex
    from gpu_env import Env
    from gpu_sections import _flex

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(flex, "create_block_mask", broken)
    env = Env(smoke=True)
    q = torch.randn(1, 4, env.seq, 16)
    doc = torch.zeros(1, env.seq, dtype=torch.long)
    out = _flex(env, q, [q, q], doc, 1.0, False)
    assert out["flex"].startswith("failed") and "no kernel" in out["flex"]
    assert not any(key.startswith("document_flex") for key in out)
