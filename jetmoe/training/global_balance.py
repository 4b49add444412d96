"""The paper's balance term over the whole global batch (train.balance_scope=global_batch), exact under 1F1B and
gradient accumulation.

Per router, with f the share of assignments per expert and P the mean router probability per expert:

    micro_batch (the paper's default):  mean over micro-batches m of  E * f(m) . P(m)
    global_batch:                       E * f(all) . P(all) = mean over m of  E * f(all) . P(m)

The second form holds because every micro-batch has the same number of tokens (P(all) is the mean of the P(m)),
and f carries no gradient: given f(all), the term is linear in each micro-batch's P, so each micro-batch can train
on its own share as soon as f(all) is known. Under 1F1B the first micro-batches go backward before the last ones
are routed, so f(all) is measured first: a forward-only pass of the pipeline over the step's micro-batches
(DeepSpeed's eval_batch, no activations kept), one all-reduce of the [layers, 2, experts] counts over every rank,
then the training pass, whose routing is the same computation on the same weights and inputs. Cost: one more
forward per step (about a third of the step's compute) and a few kilobytes of all-reduce; a cheaper estimate
(the previous step's f, or a partial batch's) would not be the global batch's term, which is what was asked.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from jetmoe.model import RouterLoss
from jetmoe.parallel.pipeline import BlockStage


class GlobalBalance:
    def __init__(self, num_layers: int, num_experts: int, device="cpu"):
        self.tokens = torch.zeros(num_layers, 2, num_experts, dtype=torch.float64, device=device)
        self.share: torch.Tensor | None = None  # f(all) [layers, 2, experts] while a step trains
        self.collecting = False

    def install(self, module: nn.Module) -> None:
        """Hook this rank's pipeline stage (every BlockStage) so its routers' balance terms use f(all)."""
        for stage in module.modules():
            if isinstance(stage, BlockStage):
                stage.rebalance = self.rebalance

    def measure(self, forward_only: Callable[[], object]) -> None:
        """Run the step's routing once (`forward_only`: the pipeline's forward over this rank's micro-batches) and
        set f(all) from the counts of every rank."""
        self.tokens.zero_()
        self.share = None
        self.collecting = True
        try:
            forward_only()
        finally:
            self.collecting = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.tokens)
        self.share = (self.tokens / self.tokens.sum(-1, keepdim=True).clamp(min=1)).float()

    def done(self) -> None:
        """After the step: evaluation and sampling route with the paper's per-batch term again."""
        self.share = None

    def rebalance(self, layer: int, kind: int, loss: RouterLoss) -> RouterLoss:
        if self.collecting:
            self.tokens[layer, kind] += loss.tokens_per_expert.to(self.tokens.device, torch.float64)
            return loss
        if self.share is None:
            return loss
        share = self.share[layer, kind].to(loss.mean_prob.device)
        balance = share.numel() * (share * loss.mean_prob).sum()
        return loss._replace(balance=balance)
