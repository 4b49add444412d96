"""Aux-loss-free load balancing (DeepSeek-V3, section 2.1.2): a per-expert bias added to a router's scores for
choosing the top-k experts only; the gates and the router losses still use the raw scores. After each optimizer
step every bias moves by `rate` towards balance:

    b_i += rate * sign(mean_j load_j - load_i)      (load: tokens the expert received in the whole global batch)

The model keeps no state for it: the biases live here, one fp32 tensor [layers, router kinds, experts] identical
on every rank (the loads it is updated from are already all-reduced by RouterTracker), and reach the routers
through their `choose` seam (the one activation recompute replays). Checkpoints keep it as the named state
"expert_bias" in trainer_state.json, not as a model weight: a transformers export carries the routers' weights
only (transformers' JetMoe has no selection bias, and would misread an extra tensor).
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable

import torch

from jetmoe.errors import JetMoEError
from jetmoe.model import JetMoEBlock


def _biased(choose: Callable, bias: torch.Tensor) -> Callable:
    @functools.wraps(choose)
    def wrapper(logits: torch.Tensor, top_k: int) -> torch.Tensor:
        return choose(logits.detach() + bias, top_k)

    return wrapper


class ExpertBias:
    def __init__(self, num_layers: int, num_experts: int, rate: float, device="cpu"):
        self.rate = rate
        self.bias = torch.zeros(num_layers, 2, num_experts, dtype=torch.float32, device=device)

    def install(self, blocks: Iterable[JetMoEBlock]) -> None:
        """Route this stage's blocks with the biases (each router reads its row of `self.bias` in place)."""
        for block in blocks:
            for kind, layer in enumerate((block.self_attention, block.mlp)):
                router = layer.router
                router.choose = _biased(router.choose, self.bias[block.layer_idx, kind])

    @torch.no_grad()
    def update(self, tokens: torch.Tensor) -> None:
        """One step's tokens per expert [layers, kinds, experts] (the whole global batch) -> the sign update."""
        load = tokens.to(self.bias.device, torch.float32)
        self.bias += self.rate * torch.sign(load.mean(-1, keepdim=True) - load)

    def state_dict(self) -> dict:
        return {"bias": self.bias.cpu().tolist()}  # JSON (trainer_state.json); fp32 values survive as floats

    def load_state_dict(self, state: dict) -> None:
        saved = torch.tensor(state["bias"], dtype=torch.float32)
        if saved.shape != self.bias.shape:
            raise JetMoEError(f"the checkpoint's expert bias has shape {list(saved.shape)}, this model needs "
                              f"{list(self.bias.shape)}; resume with the same model, or checkpoint.resume=none")
        self.bias.copy_(saved)
