"""The optimizer and its learning-rate schedule, built once from the stage's final parameters."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from jetmoe.errors import JetMoEError
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


def build_optimizer(cfg: DictConfig, groups: list[dict]) -> tuple[torch.optim.Optimizer, object]:
    """(optimizer named by optim.name, LambdaLR scheduler following optim.schedule)."""
    if cfg.optim.name not in OPTIMIZERS:
        raise JetMoEError(f"optim.name={cfg.optim.name!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps)
    multiplier = lr_multiplier(cfg.optim.schedule, cfg.train.max_steps, cfg.optim.warmup_steps,
                               cfg.optim.min_lr_ratio, cfg.optim.decay_fraction, cfg.optim.decay_shape)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
