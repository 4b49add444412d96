"""The all-to-all dispatcher computes exactly what one process holding every expert computes,
forward and backward, on 2 gloo ranks with uneven (and empty) splits."""

import pytest
import torch
import torch.distributed as dist

from helpers.accumulating_ops import AccumulatingOps
from helpers.expert_spawn import spawn
from jetmoe.parallel.expert_dispatch import AllToAllDispatcher

E, K, D, D_OUT = 4, 2, 6, 5


def _rank_data(rank, tokens):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, D, generator=g, dtype=torch.float64)
    # rank 0 never routes to expert 3: one split of the exchange is empty
    high = 3 if rank == 0 else E
    ids = torch.stack([torch.randperm(high, generator=g)[:K] for _ in range(tokens)])
    grad_out = torch.randn(tokens, K, D_OUT, generator=g, dtype=torch.float64)
    return x, ids, grad_out


def _weights():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(E, D, D_OUT, generator=g, dtype=torch.float64),
            torch.randn(E, D_OUT, D_OUT, generator=g, dtype=torch.float64))


def _reference(x, ids, w1, w2):
    """Two round trips on one plan (like MoA): y1 = x @ W1[e]; y2 = tanh(y1) @ W2[e]."""
    y1 = torch.einsum("td,tkdo->tko", x, w1[ids])
    return torch.einsum("tkd,tkdo->tko", torch.tanh(y1), w2[ids])


def _grouped(x_local, w_local, counts):
    out, start = [], 0
    for e, n in enumerate(counts.tolist()):
        out.append(x_local[start:start + n] @ w_local[e])
        start += n
    return torch.cat(out)


def _worker(rank, world, tokens_per_rank):
    w1, w2 = _weights()
    e_local = E // world
    lo = rank * e_local
    w1_local = w1[lo:lo + e_local].clone().requires_grad_()
    w2_local = w2[lo:lo + e_local].clone().requires_grad_()
    x, ids, grad_out = _rank_data(rank, tokens_per_rank[rank])
    x.requires_grad_()

    d = AllToAllDispatcher(dist.group.WORLD)
    plan = d.plan(ids, E)
    y1 = d.combine(_grouped(d.dispatch(x, plan), w1_local, plan.tokens_per_local_expert), plan)
    y2 = d.combine(_grouped(d.dispatch(torch.tanh(y1), plan), w2_local, plan.tokens_per_local_expert), plan)
    with AccumulatingOps() as mode:
        y2.backward(grad_out)
    assert mode.seen == [], mode.seen  # each token's k slot gradients are summed without atomics

    # Reference: one process, all experts, every rank's tokens.
    w1r, w2r = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    for r in range(world):
        xr, idsr, gr = _rank_data(r, tokens_per_rank[r])
        xr.requires_grad_()
        yr = _reference(xr, idsr, w1r, w2r)
        yr.backward(gr)
        if r == rank:
            torch.testing.assert_close(y2, yr, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
            counts = torch.bincount(idsr.reshape(-1), minlength=E)
    torch.testing.assert_close(w1_local.grad, w1r.grad[lo:lo + e_local], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2_local.grad, w2r.grad[lo:lo + e_local], rtol=1e-12, atol=1e-12)

    # tokens_per_local_expert = rows received from all ranks for each local expert
    all_counts = [torch.zeros(E, dtype=torch.long) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    torch.testing.assert_close(plan.tokens_per_local_expert, sum(all_counts)[lo:lo + e_local])
    # 4 all-to-alls forward + 4 backward. Rows leaving this rank: its slots for remote experts
    # (dispatch forward, combine backward) and the remote slots for its experts (combine forward,
    # dispatch backward); widths D then D_OUT for round trip 1, D_OUT for round trip 2.
    assert d.counter.calls == 8
    remote_out = int((ids // e_local != rank).sum())
    remote_in = int(sum(c[lo:lo + e_local] for i, c in enumerate(all_counts) if i != rank).sum())
    assert d.counter.bytes_sent == 8 * (remote_out + remote_in) * (D + 3 * D_OUT)


@pytest.mark.slow
def test_all_to_all_dispatch_matches_one_process():
    spawn(_worker, 2, [7, 3])
