"""A GPU check's measured efficiencies (`cluster.calibration=PATH`): the `calibration` object of the JSON that
bench/gpu.py writes, checked key by key; every problem is one line naming the file, the key and the fix."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from jetmoe.errors import JetMoEError
from jetmoe.plan.hardware import Efficiencies

REQUIRED = ("peak_bf16_tflops", "dense_gemm_tflops", "grouped_gemm_tflops", "attention_tflops", "hbm_gbps",
            "grad_accumulation_ns_per_param", "optimizer_ns_per_param")
FIX = "run `python bench/gpu.py --out gpu_check.json` on the GPU and pass that file"


@dataclass(frozen=True)
class Calibration:
    efficiencies: Efficiencies
    device: str
    peak_tflops: float
    measured: dict  # the rest of the object: the check's own training run (train_mfu, train_step_breakdown_s, ...)


def load_calibration(path: str) -> Calibration:
    file = Path(path).expanduser()
    where = f"cluster.calibration={path}"
    if not file.is_file():
        raise JetMoEError(f"{where} does not exist; {FIX}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise JetMoEError(f"{where} is not a JSON file ({type(e).__name__}: {str(e).splitlines()[0]}); {FIX}") from None
    cal = data.get("calibration") if isinstance(data, dict) else None
    if not isinstance(cal, dict):
        raise JetMoEError(f"{where} has no top-level 'calibration' object; {FIX}")
    if cal.get("smoke"):
        raise JetMoEError(f"{where} comes from a --smoke run (tiny shapes on a CPU), not a GPU; {FIX}")
    missing = [k for k in REQUIRED if cal.get(k) is None]
    if missing:
        raise JetMoEError(f"{where}: calibration lacks {', '.join(missing)} (a section did not run); {FIX}")
    for key in REQUIRED:
        value = cal[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise JetMoEError(f"{where}: calibration.{key}={value!r} must be a positive number; {FIX}")
    device = str(cal.get("device") or "unknown device")
    efficiencies = Efficiencies(
        dense_gemm_tflops=float(cal["dense_gemm_tflops"]), grouped_gemm_tflops=float(cal["grouped_gemm_tflops"]),
        attention_tflops=float(cal["attention_tflops"]), hbm_gbps=float(cal["hbm_gbps"]),
        grad_accumulation_ns_per_param=float(cal["grad_accumulation_ns_per_param"]),
        optimizer_ns_per_param=float(cal["optimizer_ns_per_param"]),
        source=f"measured by bench/gpu.py on {device} (torch {cal.get('torch', '?')}): {file.name}",
    )
    measured = {k: v for k, v in cal.items() if k not in REQUIRED}
    return Calibration(efficiencies, device, float(cal["peak_bf16_tflops"]), measured)
