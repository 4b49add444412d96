"""The resume rules: which config keys may differ from a checkpoint's, which are refused, which are applied.

A resumed run compares its config with the one the checkpoint recorded (trainer_state.json's `config`):
- refused: a `model.*` key that changes the network's weights or function (sizes, experts, vocabulary, RoPE,
  norms, special tokens). The run stops before anything is written, with one line naming the key, the
  checkpoint's value and this run's, and the ways forward (revert it, or a new run from these weights with
  `model.init_from`). The data's own checks (fingerprint, seed, samples per step, past phases) live with the
  data loaders and `checkpoint.data_changed`.
- applied, and logged: `train.lr` (the peak), `train.max_steps` and every `optim.*` key (schedule, warmup, decay,
  betas, eps, weight decay, clipping), and the objective's coefficients. The checkpoint keeps the optimizer's
  moments and the step; the learning rate of the next step is the new peak times the new schedule at that step.
- everything else (layout, micro-batch size, logging, checkpoint cadence, evaluation) may change freely.
"""

from __future__ import annotations

# model keys that may change on resume: they do not touch the weights or what the network computes
MODEL_MAY_CHANGE = ("name", "init_from", "aux_loss_coef", "z_loss_coef", "gradient_checkpointing", "use_cache",
                    "output_router_logits", "initializer_range", "attention_dropout", "max_position_embeddings")
# applied on resume and named in the log when they differ (besides every optim.* key)
APPLIED = ("train.lr", "train.max_steps", "model.aux_loss_coef", "model.z_loss_coef", "model.attention_dropout")


def _get(config: dict | None, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def refused_change(saved: dict | None, now: dict | None, folder) -> str | None:
    """The one-line refusal for the first `model.*` key that differs from the checkpoint's, or None. A checkpoint
    without a recorded config (older ones) is left to the shape checks of the weights."""
    if not saved or not now or not isinstance(saved.get("model"), dict):
        return None
    for key in sorted(set(saved["model"]) | set(now.get("model", {}))):
        if key in MODEL_MAY_CHANGE:
            continue
        before, after = _get(saved, f"model.{key}"), _get(now, f"model.{key}")
        if before != after:
            return (f"model.{key}: the checkpoint {folder} has {before!r}, this run {after!r}; a resumed run keeps the "
                    f"model: resume with model.{key}={before}, or start a new run directory from these weights with "
                    f"model.init_from={folder}")
    return None


def applied_changes(saved: dict | None, now: dict | None) -> list[str]:
    """'key old -> new' for every applied key that differs from the checkpoint's config."""
    if not saved or not now:
        return []
    keys = list(APPLIED) + [f"optim.{k}" for k in sorted(set(saved.get("optim") or {}) | set(now.get("optim") or {}))]
    return [f"{key} {_get(saved, key)} -> {_get(now, key)}" for key in keys if _get(saved, key) != _get(now, key)]


def apply_peak_lr(scheduler, lr: float) -> float:
    """Set the scheduler's peak to `lr` and every parameter group's lr to the schedule's value at the scheduler's
    position (the next update); returns that lr. `scheduler`: torch's LambdaLR, restored from the checkpoint
    (its multiplier is always this run's: LambdaLR stores no plain function)."""
    step = scheduler.last_epoch
    scheduler.base_lrs = [float(lr)] * len(scheduler.base_lrs)
    lrs = [base * multiplier(step) for base, multiplier in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, value in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = value
    return lrs[0] if lrs else float(lr)
