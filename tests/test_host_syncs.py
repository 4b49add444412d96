"""Host syncs of one block's forward+backward, counted on CPU (ops that read tensor values on the host):
none on the local path with the document mask off (or on), one per sparse layer with expert parallelism."""

import pytest
import torch
import torch.distributed as dist

from helpers.expert_spawn import spawn
from jetmoe.diagnostics import count_host_syncs
from jetmoe.model import JetMoEBlock, JetMoEForCausalLM, block_inputs, init_like_transformers
from helpers.model_hf import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _block(hidden, seed=0):
    torch.manual_seed(seed)
    block = JetMoEBlock(tiny_config(hidden_size=hidden))
    init_like_transformers(block, 0.1, seed)
    return block


def _syncs(block, x, pos, mode="auto"):
    """Syncs of one block's forward and backward, with the angles and mask a model computes once per forward."""
    with count_host_syncs() as counts:
        block(x, *block_inputs(tiny_config(hidden_size=x.shape[-1]), x, pos, mode))[0].square().sum().backward()
    return counts


def _packed_positions(t=12):
    return torch.cat([torch.arange(5), torch.arange(t - 5)]).repeat(2, 1)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_local_block_makes_no_host_sync(mode):
    block = _block(32)  # grouped matmul path
    x = torch.randn(2, 12, 32, requires_grad=True)
    assert sum(_syncs(block, x, _packed_positions(), mode).values()) == 0


def test_auto_mask_mode_checks_position_ids_once_per_forward():
    block = _block(32)
    counts = _syncs(block, torch.randn(2, 12, 32, requires_grad=True), _packed_positions())
    assert dict(counts) == {"_local_scalar_dense": 1}
    assert sum(_syncs(block, torch.randn(2, 12, 32, requires_grad=True), None).values()) == 0
    torch.manual_seed(0)
    model = JetMoEForCausalLM(tiny_config(hidden_size=32, num_hidden_layers=3))  # one check for all three blocks
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with count_host_syncs() as counts:
        model(ids, position_ids=_packed_positions()).logits.sum().backward()
    assert dict(counts) == {"_local_scalar_dense": 1}


def test_per_expert_loop_fallback_fetches_counts_once_per_layer():
    block = _block(30)  # rows not 16-byte aligned: the per-expert loop
    counts = _syncs(block, torch.randn(2, 12, 30, requires_grad=True), _packed_positions(), "off")
    assert dict(counts) == {"tolist": 2}  # MoA (2 projections) and MoE (2 projections): one fetch each


def test_fused_expert_backward_fetches_counts_once_per_projection():
    """The weights' gradients added into fp32 sums (the bf16 trainer's path): the forward stays sync-free, the
    backward fetches each projection's rows per expert once (4 per block: the planner's fused_backward_syncs)."""
    from jetmoe.model import GroupedExperts
    from jetmoe.plan.engine_model import TODAY

    block = _block(32)
    experts = [m.weight for m in block.modules() if isinstance(m, GroupedExperts)]
    for w in experts:
        w.main_grad = torch.zeros(w.shape)
    counts = _syncs(block, torch.randn(2, 12, 32, requires_grad=True), _packed_positions(), "off")
    assert dict(counts) == {"tolist": TODAY.fused_backward_syncs_per_block} and len(experts) == 4
    assert all(w.grad is None and w.main_grad.any() for w in experts)


def _ep_worker(rank, world):
    from jetmoe.parallel.expert import apply_expert_parallel

    from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing

    for hidden, recompute in ((32, False), (30, False), (32, True)):
        block = _block(hidden)
        apply_expert_parallel(block, dist.group.WORLD, rank, world)
        if recompute:  # the recompute replays the forward's plans: no second count exchange or sync
            apply_activation_checkpointing([block])
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(2, 5 + 4 * rank, hidden, generator=g, requires_grad=True)
        pos = torch.arange(x.shape[1]).expand(2, -1)
        counts = _syncs(block, x, pos, "off")
        assert dict(counts) == {"tolist": 2}, (hidden, recompute, dict(counts))  # one per sparse layer (MoA, MoE)


@pytest.mark.slow
def test_expert_parallel_block_syncs_once_per_sparse_layer():
    spawn(_ep_worker, 2)
