"""Document masks: the FlexAttention block mask gives what the dense [B, 1, T, T] SDPA mask gives (forward on
CPU through the public path; backward too, past torch's CPU guard); without FlexAttention the dense mask serves."""

import pytest
import torch

from jetmoe.model import JetMoEForCausalLM, set_document_mask
from jetmoe.errors import JetMoEError
from jetmoe.model import masking
from helpers.model_hf import tiny_config

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(masking.flex_attention is None, reason="this torch has no FlexAttention")]


def _positions():
    pos = torch.cat([torch.arange(30), torch.arange(50), torch.arange(20)]).repeat(2, 1)
    pos[1] = torch.cat([torch.arange(64), torch.arange(36)])
    return pos


@pytest.fixture
def flex_on_cpu(monkeypatch):
    monkeypatch.setattr(masking, "use_flex", True)


def test_dense_mask_keeps_documents_apart_and_causal():
    mask = masking.dense_document_mask(torch.tensor([[0, 1, 2, 0, 1]]))[0, 0]
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask, expected.bool())


def test_flex_model_logits_match_dense_mask(flex_on_cpu):
    config = tiny_config(num_hidden_layers=2)
    torch.manual_seed(0)
    model = JetMoEForCausalLM(config).eval()
    set_document_mask(model, "on")
    ids = torch.randint(0, config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    pos = _positions()
    with torch.no_grad():
        assert isinstance(masking.attention_mask(pos, "on"), masking.FlexMask)
        flex = model(ids, position_ids=pos).logits
        masking.use_flex = False
        assert isinstance(masking.attention_mask(pos, "on"), torch.Tensor)
        dense = model(ids, position_ids=pos).logits
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)


def test_flex_attention_gradients_match_dense_mask(flex_on_cpu, monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)  # torch refuses CPU backward up front only
    pos = _positions()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 100, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 100, 8, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 4, 100, 8, generator=g)
    flex = masking.attend(q, k, v, masking.flex_document_mask(pos), enable_gqa=True)
    dense = masking.attend(q, k, v, masking.dense_document_mask(pos), enable_gqa=True)
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(flex, (q, k, v), grad), torch.autograd.grad(dense, (q, k, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_training_and_missing_flex_use_the_dense_mask(flex_on_cpu, monkeypatch):
    pos = _positions()
    assert isinstance(masking.attention_mask(pos, "on", needs_grad=True), torch.Tensor)  # no CPU backward
    monkeypatch.setattr(masking, "flex_attention", None)
    assert isinstance(masking.attention_mask(pos, "on", needs_grad=False), torch.Tensor)


def test_mask_modes():
    straight = torch.arange(10).expand(2, 10)
    assert masking.attention_mask(straight, "auto") is None  # no document restarts
    assert masking.attention_mask(_positions(), "off") is None
    assert masking.attention_mask(None, "on") is None
    assert masking.attention_mask(straight, "on") is not None
    with pytest.raises(JetMoEError, match="document_mask"):
        masking.attention_mask(straight, "sometimes")
