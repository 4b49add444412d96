"""Aux-loss-free balancing (jetmoe.training.expert_bias): the sign update's direction and size on a skewed router,
selection-only effect, and a resumed run that keeps the bias."""

from __future__ import annotations

import json

import pytest
import torch

from jetmoe.model import JetMoEBlock, JetMoEConfig
from jetmoe.model.router import TopKRouter, expert_counts
from jetmoe.training.expert_bias import ExpertBias

RATE = 0.01


def _skewed_router(dim=16, experts=4, top_k=1):
    torch.manual_seed(0)
    router = TopKRouter(dim, experts, top_k)
    with torch.no_grad():
        router.layer.weight.normal_(0, 0.1)
        router.layer.weight[0] += 0.1  # expert 0 scores highest for inputs with a positive mean
    return router


def test_sign_update_moves_each_bias_by_the_rate_towards_balance():
    router = _skewed_router()
    x = torch.randn(256, 16).abs()
    counts = expert_counts(router(x).expert_ids, 4)  # expert 0 takes most tokens
    assert counts[0] > counts.float().mean()
    bias = ExpertBias(num_layers=2, num_experts=4, rate=RATE)
    tokens = torch.zeros(2, 2, 4)
    tokens[1, 1] = counts.float()
    tokens[0] = 7.0  # perfectly even: no move
    bias.update(tokens)
    mean = counts.float().mean()
    expected = torch.where(counts > mean, -RATE, torch.where(counts < mean, RATE, 0.0))
    assert torch.equal(bias.bias[1, 1], expected)
    assert torch.count_nonzero(bias.bias[0]) == 0 and torch.count_nonzero(bias.bias[1, 0]) == 0
    bias.update(tokens)  # the same loads again: one more rate in the same direction
    assert torch.equal(bias.bias[1, 1], 2 * expected)


def test_installed_bias_changes_selection_only_and_evens_the_load():
    config = JetMoEConfig(hidden_size=16, num_local_experts=4, num_experts_per_tok=1, kv_channels=4,
                          num_key_value_heads=2, intermediate_size=8, num_hidden_layers=1, vocab_size=32)
    block = JetMoEBlock(config, layer_idx=0)
    block.mlp.router = _skewed_router()
    x = torch.randn(512, 16).abs()
    before = block.mlp.router(x)
    bias = ExpertBias(num_layers=1, num_experts=4, rate=0.05)
    bias.install([block])
    spread = []
    for _ in range(40):
        counts = expert_counts(block.mlp.router(x).expert_ids, 4).float()
        spread.append(float(counts.max() - counts.min()))
        tokens = torch.zeros(1, 2, 4)
        tokens[0, 1] = counts
        bias.update(tokens)
    assert spread[-1] < spread[0] / 4  # the biases pulled the skewed router towards balance
    after = block.mlp.router(x)
    same = (after.expert_ids == before.expert_ids).squeeze(-1)
    # gates (softmax over the chosen raw logits) and the z-loss do not see the bias
    assert torch.equal(after.loss.z, before.loss.z)
    assert torch.equal(after.gates, before.gates)  # top-1: the gate is 1 whatever was chosen
    assert not same.all()


def test_state_round_trips_through_json_exactly_and_refuses_another_shape():
    from jetmoe.errors import JetMoEError

    bias = ExpertBias(3, 4, rate=1e-3)
    for _ in range(7):
        bias.update(torch.rand(3, 2, 4))
    other = ExpertBias(3, 4, rate=1e-3)
    other.load_state_dict(json.loads(json.dumps(bias.state_dict())))
    assert torch.equal(other.bias, bias.bias)
    with pytest.raises(JetMoEError, match="expert bias has shape"):
        ExpertBias(2, 4, rate=1e-3).load_state_dict(bias.state_dict())


@pytest.mark.slow
def test_resumed_run_keeps_the_bias_and_its_losses(tmp_path):
    from helpers.ckpt_run import metrics, pretrain

    cache = tmp_path / "cache"
    args = ["train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=0", "train.balance_bias_rate=0.05"]
    full = tmp_path / "full"
    pretrain(full, *args, cache_dir=cache)
    state = json.loads((full / "checkpoints/step_00000002/trainer_state.json").read_text())
    assert torch.count_nonzero(torch.tensor(state["expert_bias"]["bias"])) > 0
    resumed = tmp_path / "resumed"
    pretrain(resumed, *args, f"checkpoint.resume={full / 'checkpoints/step_00000002'}", cache_dir=cache)
    ref, rows = metrics(full), metrics(resumed)
    for step in (3, 4):
        assert rows[step]["loss"] == ref[step]["loss"], step
    final = json.loads((resumed / "checkpoints/step_00000004/trainer_state.json").read_text())
    assert final["expert_bias"] == json.loads(
        (full / "checkpoints/step_00000004/trainer_state.json").read_text())["expert_bias"]
