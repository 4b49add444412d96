"""train.deterministic: the expert dispatch's backward sums each token's k slot gradients without atomics
(no index_add over duplicated rows, which CUDA runs with atomics), and with torch's deterministic algorithms
on, two forward+backward runs give bitwise-equal gradients; parity with transformers is in test_model.py."""

import pytest
import torch

from jetmoe.model import JetMoEBlock, JetMoEForCausalLM, init_like_transformers
from jetmoe.training.determinism import set_deterministic
from helpers.accumulating_ops import AccumulatingOps
from helpers.model_hf import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def deterministic():
    set_deterministic(True)
    yield
    set_deterministic(False)


@pytest.mark.parametrize("hidden", [32, 30])  # grouped matmul; per-expert loop fallback (unaligned rows)
def test_block_backward_has_no_accumulating_ops(hidden):
    config = tiny_config(hidden_size=hidden, num_experts_per_tok=3, num_local_experts=4)
    block = JetMoEBlock(config)
    init_like_transformers(block, 0.1, seed=0)
    x = torch.randn(2, 11, hidden, requires_grad=True)
    out, _ = block(x)
    with AccumulatingOps() as mode:
        out.square().sum().backward()
    assert mode.seen == [], mode.seen


def _grads(config, ids, dtype):
    torch.manual_seed(0)
    model = JetMoEForCausalLM(config).to(dtype)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_runs_give_bitwise_equal_gradients(deterministic, dtype):
    assert torch.are_deterministic_algorithms_enabled()
    config = tiny_config(num_experts_per_tok=3)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    first, second = _grads(config, ids, dtype), _grads(config, ids, dtype)
    for name in first:
        assert torch.equal(first[name], second[name]), name
