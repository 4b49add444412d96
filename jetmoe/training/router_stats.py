"""Router statistics of one optimizer step: per layer and router, the balance loss, z-loss and
tokens per expert, summed over this rank's micro-batches, then reduced over the whole world.

Every (layer, router) is owned by exactly one pipeline stage of each data-parallel replica, so a SUM
all-reduce over all ranks followed by a division by the number of micro-batches gives the mean per
micro-batch, the same for any layout.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from jetmoe.model import ROUTER_KINDS


class RouterTracker:
    def __init__(self, num_layers: int, num_experts: int):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._records: list[tuple[int, int, object]] = []

    def record(self, layer: int, kind: int, loss) -> None:
        # Detached tensors only: no host sync per micro-batch on a GPU.
        self._records.append((layer, kind, (loss.balance.detach(), loss.z.detach(),
                                            loss.tokens_per_expert.detach())))

    def local_sums(self, device) -> torch.Tensor:
        L, E = self.num_layers, self.num_experts
        balance = torch.zeros(L, 2, dtype=torch.float64, device=device)
        z = torch.zeros_like(balance)
        micro = torch.zeros_like(balance)
        tokens = torch.zeros(L, 2, E, dtype=torch.float64, device=device)
        for layer, kind, (b, zz, t) in self._records:
            balance[layer, kind] += b.to(device, torch.float64)
            z[layer, kind] += zz.to(device, torch.float64)
            micro[layer, kind] += 1
            tokens[layer, kind] += t.to(device, torch.float64)
        return torch.cat([balance.flatten(), z.flatten(), micro.flatten(), tokens.flatten()])

    def reduce(self, device="cpu") -> "RouterStats":
        flat = self.local_sums(device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        flat = flat.cpu()
        L, E = self.num_layers, self.num_experts
        n = L * 2
        balance, z, micro = flat[:n].view(L, 2), flat[n:2 * n].view(L, 2), flat[2 * n:3 * n].view(L, 2)
        tokens = flat[3 * n:].view(L, 2, E)
        micro = micro.clamp(min=1)
        return RouterStats(balance / micro, z / micro, tokens)


class RouterStats:
    """Reduced statistics: balance/z [L, 2] (mean per micro-batch), tokens [L, 2, E] (summed)."""

    def __init__(self, balance: torch.Tensor, z: torch.Tensor, tokens: torch.Tensor):
        self.balance, self.z, self.tokens = balance, z, tokens

    @property
    def balance_loss(self) -> float:
        return float(self.balance.sum())

    @property
    def z_loss(self) -> float:
        return float(self.z.sum())

    def per_layer(self) -> dict[str, list[float]]:
        """balance per layer and router, max/min share of tokens per expert, load entropy (normalised to 1
        for a uniform load), and each layer's share per expert (for the plot's heatmap)."""
        out: dict[str, list] = {}
        share = self.tokens / self.tokens.sum(-1, keepdim=True).clamp(min=1)
        E = self.tokens.shape[-1]
        entropy = -(share * share.clamp(min=1e-12).log()).sum(-1) / math.log(E) if E > 1 else share[..., 0] * 0
        for k, kind in enumerate(ROUTER_KINDS):
            out[f"balance_{kind}"] = _round(self.balance[:, k])
            out[f"z_{kind}"] = _round(self.z[:, k])
            out[f"max_share_{kind}"] = _round(share[:, k].max(-1).values)
            out[f"min_share_{kind}"] = _round(share[:, k].min(-1).values)
            out[f"load_entropy_{kind}"] = _round(entropy[:, k])
            out[f"share_{kind}"] = [_round(row) for row in share[:, k]]
        return out


def _round(t: torch.Tensor) -> list:
    return [round(float(x), 6) for x in t]
