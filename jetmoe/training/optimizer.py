"""The optimizer and its learning-rate schedule, built once from the stage's final parameters."""

from __future__ import annotations

import torch

from jetmoe.training.schedules import lr_multiplier

OPTIMIZERS = ("adamw",)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and expert weight stacks) decay; norms and biases do not. Every group has a 'name'."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(optim, train, groups: list[dict]) -> tuple[torch.optim.Optimizer, object]:
    """(AdamW, the only optimizer `optim.name` names, with a LambdaLR scheduler following optim.schedule), from the
    optim and train sections (jetmoe.training.config)."""
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    multiplier = lr_multiplier(optim.schedule, train.max_steps, optim.warmup_steps, optim.min_lr_ratio,
                               optim.decay_fraction, optim.decay_shape)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
