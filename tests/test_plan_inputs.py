"""The planner's inputs refused with one line: cluster keys out of range, bad calibration files; a good calibration
replaces the part's efficiencies."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import plan as plan_cli  # noqa: E402

H200_CHECK = ROOT / "tests/data/gpu_check_h200.json"
RECIPE = "+experiment=jetmoe_8b_96xh100"


def refused(capsys, *overrides: str) -> str:
    assert plan_cli.main([RECIPE, *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("override,message", [
    ("cluster.mfu=2", "cluster.mfu=2.0 must be a finite number in (0, 1]"),
    ("cluster.mfu=0", "cluster.mfu=0.0 must be a finite number in (0, 1]"),
    ("cluster.peak_tflops=-989", "cluster.peak_tflops=-989.0 must be a finite number > 0"),
    ("cluster.gpu_memory_gib=0", "cluster.gpu_memory_gib=0.0 must be a finite number > 0; e.g. cluster.gpu_memory_gib=80"),
    ("cluster.gpus_per_node=0", "cluster.gpus_per_node=0 must be a finite number >= 1"),
    ("cluster.gpus=0", "cluster.gpus=0 must be a finite number >= 1"),
    ("cluster.storage_gbps=0", "cluster.storage_gbps=0.0 must be a finite number > 0"),
    ("cluster.peak_tflops=inf", "cluster.peak_tflops=inf must be a finite number > 0"),
    ("cluster.gpu=tpu", "unknown cluster.gpu='tpu'"),
    ("cluster.gpus=1.5", "cluster.gpus=1.5"),
])
def test_cluster_keys_out_of_range_are_refused(capsys, override, message):
    assert message in refused(capsys, override)


def _calibration(tmp_path, **changes) -> Path:
    data = json.loads(H200_CHECK.read_text())
    for key, value in changes.items():
        if value is None:
            del data["calibration"][key]
        else:
            data["calibration"][key] = value
    path = tmp_path / "check.json"
    path.write_text(json.dumps(data))
    return path


def test_bad_calibration_files_are_refused(capsys, tmp_path):
    assert "does not exist" in refused(capsys, f"cluster.calibration={tmp_path / 'nope.json'}")
    (tmp_path / "text.json").write_text("not json")
    assert "is not a JSON file" in refused(capsys, f"cluster.calibration={tmp_path / 'text.json'}")
    (tmp_path / "other.json").write_text(json.dumps({"memory": {}}))
    assert "no top-level 'calibration' object" in refused(capsys, f"cluster.calibration={tmp_path / 'other.json'}")
    path = _calibration(tmp_path, grouped_gemm_tflops=None)
    assert "calibration lacks grouped_gemm_tflops" in refused(capsys, f"cluster.calibration={path}")
    for bad in (0, -3.0, "fast", True):
        path = _calibration(tmp_path, hbm_gbps=bad)
        assert f"calibration.hbm_gbps={bad!r} must be a positive number" in refused(capsys, f"cluster.calibration={path}")
    path = _calibration(tmp_path, smoke=True)
    assert "--smoke run" in refused(capsys, f"cluster.calibration={path}")


def _plan(capsys, *overrides: str) -> dict:
    assert plan_cli.main([RECIPE, *overrides]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_calibration_replaces_the_parts_efficiencies(capsys, tmp_path):
    default = _plan(capsys, "cluster.gpu=h200")
    slower = _calibration(tmp_path, grouped_gemm_tflops=280.0)  # half the measured grouped GEMM rate
    calibrated = _plan(capsys, "cluster.gpu=h200", f"cluster.calibration={slower}")
    assert calibrated["efficiencies"]["grouped_gemm_tflops"] == 280.0 and "check.json" in calibrated["efficiencies"]["source"]
    assert calibrated["step_breakdown_s"]["compute"] > 1.5 * default["step_breakdown_s"]["compute"]
    assert calibrated["step_breakdown_s"]["grad_accumulation"] == pytest.approx(
        default["step_breakdown_s"]["grad_accumulation"], rel=1e-3)
    other = _plan(capsys, f"cluster.calibration={H200_CHECK}")  # the recipe's H100s, an H200's numbers
    assert any("measured on NVIDIA H200, but cluster.gpu=h100" in w for w in other["warnings"])


def test_the_planner_reads_what_the_gpu_check_writes(tmp_path):
    """bench/gpu_report.calibration rebuilt from the check's sections is the object the planner loads."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_report import calibration

    from jetmoe.plan.calibration import REQUIRED, load_calibration

    result = json.loads(H200_CHECK.read_text())
    rebuilt = calibration(result)
    assert {k: rebuilt[k] for k in REQUIRED} == {k: result["calibration"][k] for k in REQUIRED}
    path = tmp_path / "rebuilt.json"
    path.write_text(json.dumps({"calibration": rebuilt}))
    loaded = load_calibration(str(path))
    assert loaded.efficiencies.grouped_gemm_tflops == result["grouped_gemm"]["balanced"]["grouped_tflops"]
    assert loaded.device == "NVIDIA H200" and loaded.measured["train_micro_batches"] == 8
