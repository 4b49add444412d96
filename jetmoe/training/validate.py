"""The two kinds of config check each section's `check()` makes (jetmoe.training.config), and the run directory's.

Numbers a library would only reject late (AdamW's ValueError after the engine is built) or accept silently
(max_steps=0 trains nothing, eval_every=-1 evaluates every step, a negative grad_clip turns clipping off) and
names outside their choices are refused before anything starts; each problem is one JetMoEError line.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from jetmoe.errors import JetMoEError


def _describe(low, high, low_ok, high_ok) -> str:
    if high == math.inf:
        return f"{'>=' if low_ok else '>'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


def in_range(key: str, value, low: float, high: float = math.inf, example: str = "",
             low_ok: bool = True, high_ok: bool = False) -> None:
    """`value` (the key's) is a finite number between low and high (each end allowed or not)."""
    if isinstance(value, bool):
        raise JetMoEError(f"{key}={value} must be a number; e.g. {key}={example}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise JetMoEError(f"{key}={value!r} must be a number; e.g. {key}={example}") from None
    ok = math.isfinite(number) and (number > low or (low_ok and number == low)) \
        and (number < high or (high_ok and number == high))
    if not ok:
        raise JetMoEError(f"{key}={value} must be a finite number {_describe(low, high, low_ok, high_ok)}; "
                          f"e.g. {key}={example}")


def one_of(key: str, value, choices) -> None:
    if value not in choices:
        raise JetMoEError(f"{key}={value!r} is unknown; use {_either(choices)}")


def _either(choices) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_writable(run_dir: str | Path, what: str = "run directory",
                   fix: str = "pick another with hydra.run.dir=PATH") -> None:
    """The run directory (or another folder to create: `what`, `fix` name it in the error) can be written: probed
    with a file in it, or in its nearest existing ancestor when it does not exist yet (permission bits do not stop
    root, a read-only mount does; an ancestor that is a file stops everyone)."""
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
        raise JetMoEError(f"{what} {run_dir} is not writable ({e.strerror or e}); {fix}") from None
