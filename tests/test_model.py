"""Our JetMoE against transformers' JetMoeForCausalLM on the same random weights (fp32)."""

import pytest
import torch

from jetmoe.model import JetMoEForCausalLM, attach_aux_loss
from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing
from helpers.model_hf import hf_twin, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "base": {},
    "odd_sizes_top3_untied": dict(vocab_size=53, hidden_size=30, num_key_value_heads=3, kv_channels=6,
                                  intermediate_size=13, num_local_experts=5, num_experts_per_tok=3,
                                  tie_word_embeddings=False, num_hidden_layers=3),
    "top1": dict(num_local_experts=3, num_experts_per_tok=1, rms_norm_eps=1e-5),
    "padding_idx_top2_of_8": dict(num_local_experts=8, pad_token_id=0, rope_parameters={"rope_theta": 500.0}),
}


def assert_close_rel(ours, ref, rel=1e-5, what=""):
    scale = ref.abs().max().clamp_min(1e-12)
    err = (ours - ref).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def run_both(config, input_ids, position_ids=None, labels=None):
    torch.manual_seed(1)
    ours = JetMoEForCausalLM(config)
    hf = hf_twin(ours)
    out = ours(input_ids, labels=labels, position_ids=position_ids)
    ref = hf(input_ids, labels=labels, position_ids=position_ids, use_cache=False)
    return ours, hf, out, ref


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_loss_and_grads_match_transformers(name):
    config = tiny_config(**CONFIGS[name])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (3, 19), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    ours, hf, out, ref = run_both(config, ids, labels=labels)

    assert_close_rel(out.logits, ref.logits, what="logits")
    assert torch.isclose(out.lm_loss, ref.loss, rtol=1e-6), (out.lm_loss, ref.loss)

    out.lm_loss.backward()
    ref.loss.backward()
    hf_params = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert p.grad is not None, n
        assert_close_rel(p.grad, hf_params[n].grad, what=f"grad {n}")


def test_packed_documents_match_transformers_and_stay_apart():
    config = tiny_config()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 20), generator=gen)
    pos = torch.cat([torch.arange(7), torch.arange(13)]).repeat(2, 1)
    pos[1] = torch.arange(20)  # the second row is a single document
    ours, hf, out, ref = run_both(config, ids, position_ids=pos)
    assert_close_rel(out.logits, ref.logits, what="packed logits")

    with torch.no_grad():  # the second document of row 0, run alone, gives the same logits
        alone = ours(ids[:1, 7:]).logits
    assert_close_rel(out.logits[0, 7:], alone[0], what="document 2 alone")
    assert not torch.allclose(out.logits[0, 7:], ours(ids[:1]).logits[0, 7:], atol=1e-4)


def test_loss_composition_and_router_losses_present():
    config = tiny_config(aux_loss_coef=0.3, z_loss_coef=0.02)
    ids = torch.randint(0, config.vocab_size, (2, 11))
    model = JetMoEForCausalLM(config)
    out = model(ids, labels=ids)
    losses = out.router_losses
    assert len(losses) == 2 * config.num_hidden_layers
    assert sorted(losses) == sorted(
        [f"model.layers.{i}.self_attention" for i in range(2)] + [f"model.layers.{i}.mlp" for i in range(2)])
    balance = sum(l.balance for l in losses.values())
    z = sum(l.z for l in losses.values())
    torch.testing.assert_close(out.balance_loss, balance)
    torch.testing.assert_close(out.z_loss, z)
    torch.testing.assert_close(out.aux_loss, 0.3 * balance + 0.02 * z)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss)
    for l in losses.values():
        assert l.balance.requires_grad and l.z.requires_grad and not l.tokens_per_expert.requires_grad
        assert l.tokens_per_expert.dtype == torch.long and int(l.tokens_per_expert.sum()) == 2 * 11 * 2


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_same_loss_and_grads():
    config = tiny_config()
    ids = torch.randint(0, config.vocab_size, (2, 13))
    torch.manual_seed(3)
    model = JetMoEForCausalLM(config)
    plain = model(ids, labels=ids)
    g_plain = grads_of(model, plain.loss)
    apply_activation_checkpointing(model.model.layers)
    ckpt = model(ids, labels=ids)
    g_ckpt = grads_of(model, ckpt.loss)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=0)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n], rtol=1e-6, atol=1e-9, msg=n)


def test_attach_aux_loss_trains_router_losses_through_hidden_states():
    """The pipeline path: per-block attach instead of adding aux to the loss gives the same gradients."""
    config = tiny_config(aux_loss_coef=0.1, z_loss_coef=0.01)
    ids = torch.randint(0, config.vocab_size, (2, 9))
    model = JetMoEForCausalLM(config)
    g_ref = grads_of(model, model(ids, labels=ids).loss)

    hidden = model.model.embed_tokens(ids)
    for block in model.model.layers:
        hidden, losses = block(hidden)
        aux = sum(config.aux_loss_coef * l.balance + config.z_loss_coef * l.z for l in losses)
        hidden = attach_aux_loss(hidden, aux)
    logits = model.lm_head(model.model.norm(hidden))
    from jetmoe.model import causal_lm_loss, shift_labels
    g = grads_of(model, causal_lm_loss(logits, shift_labels(ids)))
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n], rtol=1e-5, atol=1e-8, msg=n)
