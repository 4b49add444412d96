"""The global-batch balance term (train.balance_scope=global_batch; jetmoe.training.global_balance): value and
gradient over micro-batches equal the one-shot paper term on the whole batch; at pp=3 x dp=2 in a real run."""

from __future__ import annotations

import math

import pytest
import torch

from jetmoe.model import JetMoEConfig
from jetmoe.parallel.pipeline import BlockStage
from jetmoe.training.global_balance import GlobalBalance

MICRO, TOKENS = 4, 12


def _stage(grad_scale):
    config = JetMoEConfig(hidden_size=32, num_local_experts=4, num_experts_per_tok=2, kv_channels=8,
                          num_key_value_heads=2, intermediate_size=16, num_hidden_layers=1, vocab_size=64,
                          aux_loss_coef=1.0, z_loss_coef=0.0)
    torch.manual_seed(0)
    stage = BlockStage(config, 0, grad_scale, on_router_loss=None)
    with torch.no_grad():
        for p in stage.parameters():
            p.normal_(0, 0.3)
    return stage.train()


def _run(stage, hidden, global_balance=None):
    """(balance of each router summed over calls x grad_scale, router weights' gradients)."""
    seen = []
    stage.on_router_loss = lambda layer, kind, loss: seen.append(float(loss.balance) * stage.grad_scale)
    batches = list(hidden.split(hidden.shape[0] // round(1 / stage.grad_scale)))
    positions = torch.arange(TOKENS).expand(batches[0].shape[0], TOKENS)
    if global_balance is not None:
        global_balance.install(stage)
        stage.eval()  # as the engine's eval_batch runs it
        with torch.no_grad():
            global_balance.measure(lambda: [stage((x, positions)) for x in batches])
        stage.train()
    stage.zero_grad()
    for x in batches:  # every micro-batch's backward runs before the next: the worst case for ordering
        out, _ = stage((x, positions))
        (out * 0).sum().backward()  # only the attached aux loss's gradient
    routers = (stage.block.self_attention.router, stage.block.mlp.router)
    return sum(seen), [r.layer.weight.grad.clone() for r in routers]


def test_value_and_gradient_over_micro_batches_equal_the_one_shot_term():
    hidden = torch.randn(MICRO, TOKENS, 32)
    one_shot, one_shot_grads = _run(_stage(1.0), hidden)
    balance, grads = _run(_stage(1.0 / MICRO), hidden, GlobalBalance(1, 4))
    assert math.isclose(balance, one_shot, rel_tol=1e-5)
    for g, ref in zip(grads, one_shot_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    per_micro, per_micro_grads = _run(_stage(1.0 / MICRO), hidden)  # the paper's per-micro-batch term differs
    assert not math.isclose(per_micro, one_shot, rel_tol=1e-3)
    assert not torch.allclose(per_micro_grads[1], one_shot_grads[1], rtol=1e-2)


def test_outside_a_step_the_paper_term_is_used():
    hidden = torch.randn(MICRO, TOKENS, 32)
    gb = GlobalBalance(1, 4)
    stage = _stage(1.0 / MICRO)
    _run(stage, hidden, gb)
    gb.done()
    assert _run(stage, hidden)[0] == _run(_stage(1.0 / MICRO), hidden)[0]


@pytest.mark.slow
def test_pp3_dp2_run_equals_the_one_shot_run(tmp_path):
    """One micro-batch of the whole global batch on one process is the one-shot term; pp=3 x dp=2 with two
    micro-batches per rank must match it, value and training (aux_loss_coef large so its gradient shows)."""
    from helpers.ckpt_run import metrics, pretrain

    cache = tmp_path / "cache"
    common = ["train.max_steps=3", "model.aux_loss_coef=5.0", "train.lr=2e-3"]
    pretrain(tmp_path / "one_shot", *common, "train.micro_batch_size=4", cache_dir=cache)
    pretrain(tmp_path / "global", *common, "train.micro_batch_size=1", "parallel.pp=3",
             "train.balance_scope=global_batch", cache_dir=cache, nproc=6, timeout=420)
    pretrain(tmp_path / "per_micro", *common, "train.micro_batch_size=1", cache_dir=cache)
    ref, rows, control = metrics(tmp_path / "one_shot"), metrics(tmp_path / "global"), metrics(tmp_path / "per_micro")
    for step in (1, 2, 3):
        for key in ("balance_loss", "lm_loss"):
            assert math.isclose(rows[step][key], ref[step][key], rel_tol=2e-5), (step, key, rows[step], ref[step])
    assert not math.isclose(control[1]["balance_loss"], ref[1]["balance_loss"], rel_tol=1e-3)
    assert not math.isclose(control[3]["lm_loss"], ref[3]["lm_loss"], rel_tol=2e-5)
