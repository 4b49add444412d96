"""Router health over a window of optimizer steps: for each router kind (MoA, MoE) and layer, how uneven the load
is (max / mean tokens per expert), how many experts received no token at all, and whether the router collapsed
(one expert took more than `collapse_share` of the router's assignments for `collapse_steps` steps in a row).

It reads the tokens per expert that RouterTracker already all-reduces every step ([layers, kinds, experts], the
same on every rank), so it adds no communication; the window is a few kilobytes of host memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from jetmoe.model import ROUTER_KINDS


@dataclass
class HealthSettings:
    window: int = 100  # steps whose loads are summed for max/mean and idle experts
    collapse_share: float = 0.9  # one expert's share of a router's assignments that counts as collapsed
    collapse_steps: int = 20  # consecutive collapsed steps before the warning


class RouterHealth:
    def __init__(self, settings: HealthSettings):
        self.settings = settings
        self._loads: deque[torch.Tensor] = deque(maxlen=settings.window)
        self._collapsed_for: torch.Tensor | None = None  # [L, kinds] consecutive collapsed steps
        self._warned: set[tuple[int, int]] = set()

    def observe(self, tokens: torch.Tensor) -> list[str]:
        """Take one step's tokens per expert [L, kinds, E]; returns the routers that have just been collapsed for
        `collapse_steps` steps ("moe.3": kind and layer), each once per collapse."""
        tokens = tokens.detach().to("cpu", torch.float64)
        self._loads.append(tokens)
        top_share = tokens.max(-1).values / tokens.sum(-1).clamp(min=1)
        collapsed = top_share > self.settings.collapse_share
        if self._collapsed_for is None:
            self._collapsed_for = torch.zeros(collapsed.shape, dtype=torch.long)
        self._collapsed_for = (self._collapsed_for + 1) * collapsed
        newly = []
        for layer, kind in self._collapsed_for.nonzero().tolist():
            key = (layer, kind)
            if self._collapsed_for[layer, kind] >= self.settings.collapse_steps and key not in self._warned:
                self._warned.add(key)
                newly.append(f"{ROUTER_KINDS[kind]}.{layer}")
        self._warned = {k for k in self._warned if collapsed[k]}  # a recovered router may warn again later
        return newly

    def collapsed(self) -> list[str]:
        """Every router collapsed for at least `collapse_steps` steps now."""
        if self._collapsed_for is None:
            return []
        return [f"{ROUTER_KINDS[k]}.{l}" for l, k in
                (self._collapsed_for >= self.settings.collapse_steps).nonzero().tolist()]

    def summary(self) -> dict[str, list]:
        """Per kind, one value per layer over the window: `max_mean_load_<kind>` (1 = perfectly even) and
        `idle_experts_<kind>` (experts that received no token)."""
        if not self._loads:
            return {}
        total = torch.stack(list(self._loads)).sum(0)  # [L, kinds, E]
        ratio = total.max(-1).values / total.mean(-1).clamp(min=1e-12)
        idle = (total == 0).sum(-1)
        out: dict[str, list] = {}
        for k, kind in enumerate(ROUTER_KINDS):
            out[f"max_mean_load_{kind}"] = [round(float(x), 4) for x in ratio[:, k]]
            out[f"idle_experts_{kind}"] = [int(x) for x in idle[:, k]]
        return out
