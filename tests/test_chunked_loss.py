"""The chunked head + cross-entropy (the last pipeline stage's loss) against the full logits' loss."""

import pytest
import torch

from jetmoe.model import causal_lm_loss, linear_causal_lm_loss, shift_labels


def _case(tokens, dim, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, tokens // 2, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) * 0.2).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, tokens // 2), generator=g)
    labels[0, :5] = -100  # ignored positions (padding, document ends)
    return hidden, weight, shift_labels(labels)


def _loss_and_grads(fn, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels)
    loss.backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("chunk", [7, 64, 1000])  # uneven last chunk, several chunks, one chunk
def test_chunked_equals_full_fp32(chunk):
    hidden, weight, labels = _case(96, 32, 301, torch.float32)
    full = _loss_and_grads(lambda h, w, y: causal_lm_loss(h @ w.T, y), hidden, weight, labels)
    chunked = _loss_and_grads(lambda h, w, y: linear_causal_lm_loss(h, w, y, chunk), hidden, weight, labels)
    for a, b in zip(chunked, full):
        assert _rel(a, b) < 1e-6
    # the comparison can fail: dropping the ignore mask changes the loss and gradients
    wrong = _loss_and_grads(lambda h, w, y: linear_causal_lm_loss(h, w, y.clamp(min=0), chunk), hidden, weight, labels)
    assert _rel(wrong[0], full[0]) > 1e-3 and _rel(wrong[2], full[2]) > 1e-3


def test_chunked_equals_full_bf16():
    hidden, weight, labels = _case(64, 32, 128, torch.bfloat16)
    full = _loss_and_grads(lambda h, w, y: causal_lm_loss(h @ w.T, y), hidden, weight, labels)
    chunked = _loss_and_grads(lambda h, w, y: linear_causal_lm_loss(h, w, y, 16), hidden, weight, labels)
    assert _rel(chunked[0], full[0]) < 1e-6  # the loss is fp32 from the same bf16 logits
    for a, b in zip(chunked[1:], full[1:]):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 2e-2  # bf16 rounding of the gradients


def test_backward_multiplies_the_kept_gradient_back_without_computing_the_logits_again():
    """Forward keeps hidden, weight and one fp32 [tokens, vocab] gradient (no working-dtype logits); backward runs
    exactly the two products of that gradient (no matmul producing logits again); the loss without gradients
    keeps nothing of that size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    hidden, weight, labels = _case(256, 16, 4000, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = linear_causal_lm_loss(hidden, weight, labels, 32)
    assert sorted(saved)[-3:] == sorted([hidden.numel(), weight.numel(), 256 * 4000])
    assert sum(saved) == hidden.numel() + weight.numel() + 256 * 4000 + 1

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "matmul"):
                self.shapes.append(tuple(out.shape))
            return out

    with Matmuls() as mode:
        loss.backward()
    assert sorted(mode.shapes) == sorted([tuple(hidden.reshape(-1, 16).shape), tuple(weight.shape)])
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        saved.clear()
        linear_causal_lm_loss(hidden, weight, labels, 32)
    assert saved == []
