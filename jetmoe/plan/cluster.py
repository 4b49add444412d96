"""The `cluster.*` keys the planner reads, checked up front: each bad value is one line naming the key, what it
must be and an example, before any arithmetic could divide by it or print a negative throughput."""

import math
from typing import Any

from jetmoe.errors import JetMoEError
from jetmoe.plan.hardware import GPUS
from jetmoe.plan.params import cfg_get

# key -> (integer?, may be null?, lowest, lowest allowed itself?, highest, example)
_NUMBERS = {
    "gpus": (True, False, 1, True, math.inf, "96"),
    "gpus_per_node": (True, False, 1, True, math.inf, "8"),
    "peak_tflops": (False, True, 0, False, math.inf, "989"),
    "gpu_memory_gib": (False, True, 0, False, math.inf, "80"),
    "mfu": (False, True, 0, False, 1, "0.35 (or null: the measured efficiencies)"),
    "storage_gbps": (False, False, 0, False, math.inf, "2.0"),
}


def _bad(key: str, value: Any, must: str, example: str) -> JetMoEError:
    return JetMoEError(f"cluster.{key}={value!r} must be {must}; e.g. cluster.{key}={example}")


def check_cluster(cluster: Any) -> None:
    gpu = cfg_get(cluster, "gpu")
    if str(gpu).lower() not in GPUS:
        raise JetMoEError(f"unknown cluster.gpu={gpu!r}; use one of {sorted(GPUS)} "
                          "(or set cluster.peak_tflops and cluster.gpu_memory_gib for another part)")
    for key, (integer, nullable, low, low_ok, high, example) in _NUMBERS.items():
        value = cfg_get(cluster, key)
        if value is None or value == "???":
            if nullable:
                continue
            raise _bad(key, value, "set", example)
        kind = "a whole number" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(key, value, kind, example)
        if integer and value != int(value):
            raise _bad(key, value, kind, example)
        above = value > low or (low_ok and value == low)
        if not (math.isfinite(value) and above and value <= high):
            bound = f"{'>=' if low_ok else '>'} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
            raise _bad(key, value, f"{kind} {bound}", example)
    path = cfg_get(cluster, "calibration")
    if path is not None and not isinstance(path, str):
        raise _bad("calibration", path, "a path to bench/gpu.py's JSON", "gpu_check.json")
