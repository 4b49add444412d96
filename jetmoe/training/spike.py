"""Loss-spike detection from the recent history of the LM loss and the gradient norm (`train.spike.*`).

A step is a spike when its LM loss (or its gradient norm) lies above the mean of the last `window` steps by
more than `sigma` deviations and by more than `min_rise` of the mean. The second condition keeps a very flat
history (tiny deviation) from calling ordinary noise a spike. Detection starts once the window is full. Steps
found to be spikes do not enter the history, so one spike does not hide the next. The history is part of
every checkpoint (a rollback or a resume judges the next steps exactly as before).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Spike:
    signal: str  # "lm_loss" or "grad_norm"
    value: float
    mean: float
    std: float
    threshold: float

    def describe(self) -> str:
        return (f"{self.signal} {self.value:.4g} above its last steps' mean {self.mean:.4g} "
                f"(deviation {self.std:.3g}, threshold {self.threshold:.4g})")

    def as_dict(self) -> dict:
        return {"signal": self.signal, "value": self.value, "mean": self.mean, "std": self.std,
                "threshold": self.threshold}


class SpikeDetector:
    def __init__(self, window: int, loss_sigma: float, grad_norm_sigma: float, min_rise: float):
        self.window = window
        self.sigmas = {"lm_loss": loss_sigma, "grad_norm": grad_norm_sigma}
        self.min_rise = min_rise
        self.history = {name: deque(maxlen=window) for name in self.sigmas}

    @classmethod
    def from_settings(cls, spike) -> "SpikeDetector":
        """From the train.spike section."""
        return cls(spike.window, spike.loss_sigma, spike.grad_norm_sigma, spike.min_rise)

    def check(self, lm_loss: float, grad_norm: float | None) -> Spike | None:
        """The spike these values make against the history (None: none). Changes nothing."""
        for name, value in (("lm_loss", lm_loss), ("grad_norm", grad_norm)):
            sigma, past = self.sigmas[name], self.history[name]
            if not sigma or value is None or not math.isfinite(value) or len(past) < self.window:
                continue
            mean = sum(past) / len(past)
            std = math.sqrt(sum((v - mean) ** 2 for v in past) / len(past))
            threshold = mean + max(sigma * std, self.min_rise * abs(mean))
            if value > threshold:
                return Spike(name, value, mean, std, threshold)
        return None

    def record(self, lm_loss: float, grad_norm: float | None) -> None:
        """Add a step that was not a spike to the history."""
        for name, value in (("lm_loss", lm_loss), ("grad_norm", grad_norm)):
            if value is not None and math.isfinite(value):
                self.history[name].append(float(value))

    def state_dict(self) -> dict:
        return {name: list(values) for name, values in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, values in self.history.items():
            values.clear()
            values.extend(float(v) for v in state.get(name, []))
