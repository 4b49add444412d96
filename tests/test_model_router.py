"""Router losses against the JetMoE paper's formulas (section 2.4), written out independently here."""

import math

import pytest
import torch

from jetmoe.model import JetMoEForCausalLM, LocalDispatcher, TopKRouter, grouped_linear, router_loss
from helpers.model_hf import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def paper_losses(logits, top_k):
    """Plain loops in float64: f_i = share of the T*k assignments, P_i = mean softmax probability,
    balance = E * sum_i f_i P_i, z = mean_t (log sum_i exp(logit_ti))^2."""
    logits = logits.double()
    t, e = logits.shape
    chosen = [set(row.topk(top_k).indices.tolist()) for row in logits]
    f = [sum(i in c for c in chosen) / (t * top_k) for i in range(e)]
    probs = logits.softmax(-1)
    p = [probs[:, i].mean() for i in range(e)]
    balance = e * sum(f[i] * p[i] for i in range(e))
    z = sum(math.log(sum(math.exp(v) for v in row.tolist())) ** 2 for row in logits) / t
    return balance, z, torch.tensor([sum(i in c for c in chosen) for i in range(e)])


def test_router_losses_match_paper_formulas_in_full_model():
    config = tiny_config(num_local_experts=5, num_experts_per_tok=3)
    model = JetMoEForCausalLM(config)
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(lambda m, a, out, name=name: inputs.__setitem__(
                name, (a[0].float() @ m.layer.weight.float().T).detach()))
    ids = torch.randint(0, config.vocab_size, (2, 17))
    out = model(ids, labels=ids)
    total_b = total_z = 0.0
    for name, logits in inputs.items():
        b, z, counts = paper_losses(logits, config.num_experts_per_tok)
        loss = out.router_losses[name.removesuffix(".router").removesuffix(".experts")]
        assert torch.isclose(loss.balance.double(), b, rtol=1e-5), name
        assert math.isclose(loss.z.item(), z, rel_tol=1e-5), name
        assert torch.equal(loss.tokens_per_expert, counts), name
        total_b, total_z = total_b + b, total_z + z
    assert len(inputs) == 2 * config.num_hidden_layers
    assert math.isclose(out.balance_loss.item(), float(total_b), rel_tol=1e-5)
    assert math.isclose(out.z_loss.item(), total_z, rel_tol=1e-5)


def test_router_loss_gradients_match_autograd_of_the_formula():
    logits = torch.randn(23, 6, dtype=torch.float64, requires_grad=True)
    ids = logits.topk(2, dim=-1).indices
    ours = router_loss(logits, ids)
    f = torch.stack([(ids == i).any(-1).double().sum() for i in range(6)]) / ids.numel()
    ref_b = 6 * (f * logits.softmax(-1).mean(0)).sum()
    ref_z = torch.log(logits.exp().sum(-1)).pow(2).mean()
    for a, b in [(ours.balance, ref_b), (ours.z, ref_z)]:
        ga, = torch.autograd.grad(a, logits, retain_graph=True)
        gb, = torch.autograd.grad(b, logits, retain_graph=True)
        torch.testing.assert_close(ga, gb)


def test_perfectly_balanced_routing_gives_balance_one():
    for experts, top_k in [(4, 1), (4, 2), (8, 2), (5, 3)]:
        router = TopKRouter(experts, experts, top_k)
        with torch.no_grad():
            router.layer.weight.copy_(torch.eye(experts) * 3.0)
        # token t prefers experts t, t+1, ..., t+k-1 (mod E): every expert is chosen exactly k times per E tokens
        x = torch.zeros(2 * experts, experts)
        for t in range(2 * experts):
            for j in range(top_k):
                x[t, (t + j) % experts] = top_k - j + 0.25 * torch.rand(()).item() / top_k
        routing = router(x)
        assert torch.equal(routing.loss.tokens_per_expert, torch.full((experts,), 2 * top_k))
        torch.testing.assert_close(routing.loss.balance, torch.tensor(1.0))
        # ... and a skewed router scores above 1
        skewed_logits = torch.randn(40, experts) - torch.arange(experts) * 2.0
        skewed = router_loss(skewed_logits, skewed_logits.topk(top_k).indices)
        assert skewed.balance > 1.5


def test_gates_are_softmax_over_chosen_logits_in_fp32():
    router = TopKRouter(16, 6, 2).bfloat16()
    x = torch.randn(9, 16).bfloat16()
    expert_ids, gates, loss = router(x)
    logits = x.float() @ router.layer.weight.float().T  # the matmul too runs in fp32
    torch.testing.assert_close(expert_ids, logits.topk(2).indices)
    torch.testing.assert_close(gates, logits.topk(2).values.softmax(-1))
    assert gates.dtype == torch.float32
    torch.testing.assert_close(loss.z, torch.logsumexp(logits, -1).square().mean())


def test_weighted_sum_over_slots_accumulates_in_fp32():
    from jetmoe.model.moe import weighted_sum_over_slots

    y = torch.randn(5, 3, 8).bfloat16()
    gates = torch.rand(5, 3).softmax(-1)
    out = weighted_sum_over_slots(y, gates)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (gates[..., None] * y.float()).sum(1).bfloat16())


def test_local_dispatcher_groups_by_expert_and_restores_order():
    d = LocalDispatcher()
    ids = torch.tensor([[2, 0], [1, 2], [0, 3], [2, 1]])
    plan = d.plan(ids, 5)
    assert plan.tokens_per_local_expert.tolist() == [2, 2, 3, 1, 0]
    x = torch.arange(4.0)[:, None] * 10
    grouped = d.dispatch(x, plan).squeeze(1).tolist()
    assert grouped == [0.0, 20.0, 10.0, 30.0, 0.0, 10.0, 30.0, 20.0]  # stable: token order within an expert
    per_slot = torch.randn(4, 2, 3)
    torch.testing.assert_close(d.combine(d.dispatch(per_slot, plan), plan), per_slot, rtol=0, atol=0)


def test_grouped_linear_matches_per_expert_loop():
    for dtype, (d_in, d_out) in [(torch.float32, (16, 8)), (torch.float32, (6, 5)), (torch.bfloat16, (16, 32))]:
        counts = torch.tensor([3, 0, 5, 1])
        x = torch.randn(9, d_in, dtype=dtype, requires_grad=True)
        w = torch.randn(4, d_out, d_in, dtype=dtype, requires_grad=True)
        y = grouped_linear(x, w, counts)
        ref = torch.cat([xe @ we.T for xe, we in zip(x.split(counts.tolist()), w)])
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, ref, **tol)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g), **tol)


def test_swiglu_matches_autograd_reference():
    from jetmoe.model.layers import swiglu

    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    a, b = h.chunk(2, -1)
    torch.testing.assert_close(swiglu(h), torch.nn.functional.silu(a) * b)


def test_rotary_matches_rotate_half_reference():
    from jetmoe.model.layers import apply_rotary, rotary_cos_sin

    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.tensor([[0, 1, 2, 0, 1], [3, 4, 5, 6, 7]]), 8, 10000.0, torch.float64)
    x1, x2 = x.chunk(2, -1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), x * cos + torch.cat((-x2, x1), -1) * sin)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))


def test_fp32_router_and_slot_sum_gradients_match_autograd():
    """The custom backwards (which keep bf16 inputs, not fp32 copies) give autograd's gradients of the fp32 math."""
    from jetmoe.model.moe import weighted_sum_over_slots
    from jetmoe.model.router import _Fp32Linear

    def grads(fn, ref, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.dtype)
        ours = torch.autograd.grad(out, inputs, g)
        refs = torch.autograd.grad(ref(*inputs), inputs, g.float())
        for a, b in zip(ours, refs):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b)

    x, w = torch.randn(7, 16).bfloat16(), torch.randn(5, 16).bfloat16()
    grads(_Fp32Linear.apply, lambda x, w: torch.nn.functional.linear(x.float(), w.float()), x, w)
    y, gates = torch.randn(7, 3, 4).bfloat16(), torch.rand(7, 3)
    grads(weighted_sum_over_slots, lambda y, g: (g[..., None] * y.float()).sum(1), y, gates)
