"""Up-front checks of the numbers a library would only reject late (AdamW's ValueError after the engine
is built) or accept silently (max_steps=0 trains nothing, eval_every=-1 evaluates every step, a negative
grad_clip turns clipping off), and of the run directory (Hydra's own logging would fail with a traceback).
Run by the entry point before Hydra starts and again by the trainer; each problem is one JetMoEError line."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from jetmoe.errors import JetMoEError

# key -> (lowest, highest, lowest allowed itself?, highest allowed itself?, an example of a good value)
_RANGES = {
    "train.lr": (0, math.inf, True, False, "5e-4"),
    "train.max_steps": (1, math.inf, True, False, "200"),
    "train.global_batch_size": (1, math.inf, True, False, "16"),
    "train.micro_batch_size": (1, math.inf, True, False, "4"),
    "train.eval_every": (0, math.inf, True, False, "100 (0 = never)"),
    "train.eval_batches": (1, math.inf, True, False, "4"),
    "train.log_every": (1, math.inf, True, False, "10"),
    "train.max_skipped_steps": (1, math.inf, True, False, "5"),
    "train.stall_warn_s": (0, math.inf, True, False, "600 (0 = off)"),
    "optim.warmup_steps": (0, math.inf, True, False, "20"),
    "optim.decay_fraction": (0, 1, True, True, "0.1"),
    "optim.min_lr_ratio": (0, 1, True, True, "0.1"),
    "optim.weight_decay": (0, math.inf, True, False, "0.1"),
    "optim.beta1": (0, 1, True, False, "0.9"),
    "optim.beta2": (0, 1, True, False, "0.95"),
    "optim.eps": (0, math.inf, False, False, "1e-8"),
    "optim.grad_clip": (0, math.inf, True, False, "1.0 (0 = no clipping)"),
    "parallel.pp": (1, math.inf, True, False, "1"),
    "parallel.ep": (1, math.inf, True, False, "1"),
    "parallel.timeout_s": (0, math.inf, False, False, "1800"),
    "checkpoint.every": (0, math.inf, True, False, "100 (0 = only on a stop signal)"),
    "data.seq_len": (1, math.inf, True, False, "2048"),
}


def _get(cfg: DictConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return None
        node = node[part]
    return node


def _describe(low, high, low_ok, high_ok) -> str:
    if high == math.inf:
        return f"{'>=' if low_ok else '>'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


def check_values(cfg: DictConfig) -> None:
    for key, (low, high, low_ok, high_ok, example) in _RANGES.items():
        value = _get(cfg, key)
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise JetMoEError(f"{key}={value!r} must be a number; e.g. {key}={example}") from None
        ok = math.isfinite(number) and (number > low or (low_ok and number == low)) \
            and (number < high or (high_ok and number == high))
        if not ok:
            raise JetMoEError(f"{key}={value} must be a finite number {_describe(low, high, low_ok, high_ok)}; "
                              f"e.g. {key}={example}")


def check_writable(run_dir: str | Path) -> None:
    """The run directory can be written: probed with a file in it, or in its nearest existing ancestor
    when it does not exist yet (permission bits do not stop root, a read-only mount does)."""
    run_dir = Path(run_dir).absolute()
    target = run_dir
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        if not target.is_dir():
            raise NotADirectoryError(f"{target} is a file")
        fd, probe = tempfile.mkstemp(prefix=".jetmoe-write-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise JetMoEError(f"run directory {run_dir} is not writable ({e.strerror or e}); "
                          "pick another with hydra.run.dir=PATH") from None
