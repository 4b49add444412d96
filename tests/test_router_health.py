"""Router health (jetmoe.training.router_health): max/mean load, idle experts, and the collapse warning."""

from __future__ import annotations

import logging

import torch

from jetmoe.training.router_health import HealthSettings, RouterHealth

LAYERS, EXPERTS = 3, 4


def _even(tokens_per_expert=8):
    return torch.full((LAYERS, 2, EXPERTS), float(tokens_per_expert))


def _collapsed(layer, kind):
    tokens = _even()
    tokens[layer, kind] = torch.tensor([29.0, 1.0, 1.0, 1.0])  # 29/32 = 0.906 on expert 0
    return tokens


def test_a_collapsed_router_is_reported_after_the_configured_steps_and_only_once():
    health = RouterHealth(HealthSettings(window=10, collapse_share=0.9, collapse_steps=3))
    reports = [health.observe(_collapsed(2, 1)) for _ in range(5)]
    assert reports == [[], [], ["moe.2"], [], []]
    assert health.collapsed() == ["moe.2"]


def test_a_router_below_the_share_or_recovering_in_time_is_not_reported():
    health = RouterHealth(HealthSettings(window=10, collapse_share=0.95, collapse_steps=2))
    assert [health.observe(_collapsed(0, 0)) for _ in range(4)] == [[]] * 4  # 0.906 < 0.95
    health = RouterHealth(HealthSettings(window=10, collapse_share=0.9, collapse_steps=3))
    steps = [_collapsed(0, 0), _collapsed(0, 0), _even(), _collapsed(0, 0), _collapsed(0, 0)]
    assert [health.observe(t) for t in steps] == [[]] * 5
    assert health.collapsed() == []


def test_window_summary_counts_idle_experts_and_max_over_mean():
    health = RouterHealth(HealthSettings(window=2, collapse_share=0.9, collapse_steps=3))
    old = _even()
    old[1, 0] = torch.tensor([0.0, 0.0, 0.0, 32.0])
    health.observe(old)  # falls out of the window below
    skewed = _even()
    skewed[1, 0] = torch.tensor([20.0, 12.0, 0.0, 0.0])
    health.observe(skewed)
    health.observe(skewed)
    summary = health.summary()
    assert summary["idle_experts_moa"] == [0, 2, 0]
    assert summary["idle_experts_moe"] == [0, 0, 0]
    assert summary["max_mean_load_moa"][1] == 40 / 16
    assert summary["max_mean_load_moe"] == [1.0] * LAYERS


def test_trainer_row_and_warning_name_the_collapsed_router(caplog):
    from types import SimpleNamespace

    from jetmoe.training.trainer import Trainer

    trainer = Trainer.__new__(Trainer)
    trainer.config = SimpleNamespace(logging=SimpleNamespace(router_collapse_share=0.9, router_collapse_steps=2))
    trainer.router_health = RouterHealth(HealthSettings(window=5, collapse_share=0.9, collapse_steps=2))
    logger = logging.getLogger("jetmoe")
    logger.addHandler(caplog.handler)
    try:
        assert trainer._router_collapse(_collapsed(1, 0)) == {}
        row = trainer._router_collapse(_collapsed(1, 0))
    finally:
        logger.removeHandler(caplog.handler)
    assert row == {"router_collapsed": ["moa.1"], "routers_collapsed": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "router moa.1 collapsed" in warnings[0]
