"""The typed run config train/plan.py would plan for these overrides (its sections checked)."""

from jetmoe.training.compose import load

PLAN_SECTIONS = ("model", "train", "optim", "parallel", "cluster", "plan")


def compose_config(overrides: list[str]):
    return load(list(overrides), PLAN_SECTIONS)
