"""The one peak-TFLOP/s table: exact device names, never substrings; the planner's parts and the trainer's MFU
read it."""

import pytest

from jetmoe.plan.hardware import GPUS, PEAK_TFLOPS, device_peak_tflops, gpu_spec
from jetmoe.training import metrics


@pytest.mark.parametrize("device,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                         ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_peaks_by_exact_device_name(device, peak):
    assert device_peak_tflops(device) == peak


def test_a_name_that_only_contains_a_known_part_is_unknown():
    assert device_peak_tflops("NVIDIA H100") is None and device_peak_tflops("NVIDIA H200 SXM") is None
    assert device_peak_tflops("H100 PCIe") is None and device_peak_tflops("NVIDIA H200 NVL") == 835.0


def test_planner_parts_take_their_peak_from_the_table():
    assert set(GPUS) >= {"h100", "h100_pcie", "h100_nvl", "h200", "a100"}
    assert all(g.peak_tflops in PEAK_TFLOPS.values() for g in GPUS.values())
    assert gpu_spec("h100_pcie").peak_tflops == 756.0 and gpu_spec("H100").peak_tflops == 989.0


def test_training_mfu_uses_the_device_it_runs_on(monkeypatch):
    monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert metrics.peak_tflops(None, cuda=True, bf16=True) == 756.0
    assert metrics.peak_tflops(None, cuda=True, bf16=False) == 378.0  # tf32: half
    assert metrics.peak_tflops(500.0, cuda=True, bf16=True) == 500.0  # cluster.peak_tflops wins
    assert metrics.peak_tflops(None, cuda=False, bf16=True) is None  # no MFU on a CPU
    monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4090")
    assert metrics.peak_tflops(None, cuda=True, bf16=True) is None
