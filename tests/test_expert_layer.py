"""ep=2 on 2 gloo ranks computes what one process holding every expert computes: outputs, router
losses, and the gradients of dense and expert parameters (MoA and MoE experts both spread)."""

import pytest
import torch
import torch.distributed as dist

from helpers.expert_spawn import spawn
from jetmoe.model import JetMoEConfig, JetMoEForCausalLM
from jetmoe.parallel.expert import apply_expert_parallel, reduce_tokens_per_expert

B, T = 2, 12


def _config():
    return JetMoEConfig.preset("jetmoe_tiny", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                               num_key_value_heads=2, kv_channels=8, intermediate_size=32,
                               num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def _model():
    torch.manual_seed(0)
    return JetMoEForCausalLM(_config())


def _batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, 64, (B, T), generator=g)
    return ids, ids.clone()


def _worker(rank, world, include_attention):
    model = _model()
    counter = apply_expert_parallel(model, dist.group.WORLD, rank, world, include_attention=include_attention)
    ids, labels = _batch(rank)
    out = model(ids, labels=labels)
    out.loss.backward()
    counts = reduce_tokens_per_expert(out.router_losses)

    e_local = 4 // world
    lo = rank * e_local
    reference = _model()
    ref_counts, grads = {}, []
    for r in range(world):
        reference.zero_grad()
        ids_r, labels_r = _batch(r)
        ref_out = reference(ids_r, labels=labels_r)
        ref_out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters()})
        for name, loss in ref_out.router_losses.items():
            ref_counts[name] = ref_counts.get(name, 0) + loss.tokens_per_expert
        if r == rank:
            for key in ("logits", "lm_loss", "balance_loss", "z_loss", "aux_loss", "loss"):
                torch.testing.assert_close(getattr(out, key), getattr(ref_out, key), rtol=1e-5, atol=1e-6)

    ref_params = dict(reference.named_parameters())
    sliced = 0
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False:
            # this rank's experts saw the tokens of every rank
            sliced += 1
            torch.testing.assert_close(p.detach(), ref_params[name].detach()[lo:lo + e_local])
            expected = sum(g[name] for g in grads)[lo:lo + e_local]
        else:
            expected = grads[rank][name]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6, msg=name)
    layers = 2 * (2 if include_attention else 1)
    assert sliced == 2 * layers
    assert counter.bytes_sent > 0
    assert counts.keys() == ref_counts.keys()
    for name in counts:
        torch.testing.assert_close(counts[name], ref_counts[name])


@pytest.mark.slow
@pytest.mark.parametrize("include_attention", [True, False])
def test_expert_parallel_layer_matches_one_process(include_attention):
    spawn(_worker, 2, include_attention)
