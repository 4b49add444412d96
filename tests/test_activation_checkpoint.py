"""Activation recompute of blocks with experts: same gradients as no recompute, in bf16 too, and the
recompute replays the forward's routing (no second top-k, the same dropless shapes even if a second
choice would differ)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.model_hf import tiny_config
from jetmoe.model import JetMoEBlock, init_like_transformers
from jetmoe.model.router import choose_top_k
from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing

pytestmark = pytest.mark.usefixtures("one_thread")


class CountTopK(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is torch.ops.aten.topk.default
        return func(*args, **(kwargs or {}))


def _block(dtype):
    block = JetMoEBlock(tiny_config(num_local_experts=4, num_experts_per_tok=2))
    init_like_transformers(block, 0.2, seed=3)
    return block.to(dtype)


def _grads(block, x):
    x = x.detach().clone().requires_grad_(True)
    out, losses = block(x)
    loss = out.float().square().mean() + sum(l.balance + l.z for l in losses)
    with CountTopK() as backward_topk:
        loss.backward()
    return [x.grad] + [p.grad for p in block.parameters()], backward_topk.calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_gives_the_same_gradients_without_routing_again(dtype):
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain, _ = _grads(_block(dtype), x)
    block = _block(dtype)
    apply_activation_checkpointing([block])
    recomputed, topk_in_backward = _grads(block, x)
    assert topk_in_backward == 0  # the recompute replayed the forward's choice of experts
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_recompute_keeps_the_forward_choice_when_a_second_choice_would_differ():
    """A router whose choice changes between calls (as a bf16 near-tie can): the recompute still sees the
    forward's experts and shapes, so backward runs and matches the forward it differentiates."""
    calls = []

    def fickle():
        mine = []

        def choose(logits, top_k):  # the best experts on a router's first call, the worst ones after that
            mine.append(1)
            calls.append(1)
            return choose_top_k(logits if len(mine) == 1 else -logits, top_k)
        return choose

    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    reference = _block(torch.float32)
    for layer in (reference.self_attention, reference.mlp):
        layer.router.choose = choose_top_k
    expected, _ = _grads(reference, x)

    block = _block(torch.float32)
    for layer in (block.self_attention, block.mlp):
        layer.router.choose = fickle()
    apply_activation_checkpointing([block])
    got, _ = _grads(block, x)
    assert len(calls) == 2  # chosen once per router in forward; the recompute asked nobody
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
