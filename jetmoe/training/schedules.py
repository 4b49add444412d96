"""Learning-rate schedules as multipliers of the peak lr, indexed by optimizer update (0-based).

cosine: linear warmup, then cosine from 1 down to min_lr_ratio at the last step.
wsd:    linear warmup, constant 1, then over the last `decay_fraction` of the steps a decay to
        min_lr_ratio (exp: geometric, as in MiniCPM/JetMoE; linear; cosine), reached at the last step.
constant: linear warmup, then 1.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("wsd", "cosine", "constant")
DECAY_SHAPES = ("exp", "linear", "cosine")


def lr_multiplier(schedule: str, max_steps: int, warmup_steps: int, min_lr_ratio: float,
                  decay_fraction: float = 0.1, decay_shape: str = "exp") -> Callable[[int], float]:
    """The schedule's multiplier by update; its arguments are the `optim` section's, checked there
    (jetmoe.training.config.OptimSection.check)."""
    warmup = min(warmup_steps, max_steps)

    if schedule == "cosine":
        decay_start, shape = warmup, "cosine"
    elif schedule == "wsd":
        decay_start, shape = max(warmup, max_steps - round(decay_fraction * max_steps)), decay_shape
    else:
        decay_start, shape = max_steps, "linear"
    decay_steps = max_steps - decay_start

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start or decay_steps == 0:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return _decay(shape, progress, min_lr_ratio)

    return multiplier


def _decay(shape: str, progress: float, floor: float) -> float:
    if shape == "exp":
        return floor ** progress
    if shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
