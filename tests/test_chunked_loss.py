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


def test_no_full_logits_held():
    """Backward keeps only hidden, weight, labels and one fp32 logsumexp per token."""
    hidden, weight, labels = _case(256, 16, 4000, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_causal_lm_loss(hidden, weight, labels, 32)
    assert max(saved) == weight.numel() and sum(saved) < hidden.numel() + weight.numel() + 3 * 256 + 1
