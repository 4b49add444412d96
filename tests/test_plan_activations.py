"""The planner's activation bytes against what autograd really keeps for backward in jetmoe/model."""

import pytest
import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM
from jetmoe.model.model import JetMoEBlock, block_inputs
from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing
from jetmoe.plan.memory import block_activation_bytes, checkpointed_block_bytes, head_activation_bytes
from jetmoe.plan.params import ModelShape


def saved_bytes(fn, exclude) -> int:
    """Bytes of the distinct storages autograd saves while running fn() (parameters excluded)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


SHAPES = {
    "tiny": {},
    "odd": dict(num_local_experts=6, num_experts_per_tok=3, kv_channels=8, num_key_value_heads=3,
                intermediate_size=96),
}


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(SHAPES))
def test_block_activation_bytes(name, dtype, documents):
    torch.manual_seed(0)
    cfg = JetMoEConfig.preset("jetmoe_tiny", **SHAPES[name])
    block = JetMoEBlock(cfg).to(dtype)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.02)
    batch, seq = 2, 96
    leaf = torch.randn(batch, seq, cfg.hidden_size, requires_grad=True)
    hidden = (leaf * 1.0).to(dtype)  # a non-leaf input, as between blocks
    # packed documents restart their position ids; the block then masks attention across them
    position_ids = torch.cat([torch.arange(40), torch.arange(seq - 40)]).expand(batch, seq) if documents else None
    got = saved_bytes(lambda: block(hidden, *block_inputs(cfg, hidden, position_ids)), list(block.parameters()))
    want = block_activation_bytes(ModelShape.from_config(cfg), batch, seq, hidden.element_size(),
                                  document_mask=documents)
    assert want == pytest.approx(got, rel=0.02)


def test_whole_model_and_checkpointing():
    torch.manual_seed(0)
    cfg = JetMoEConfig.preset("jetmoe_tiny")
    shape = ModelShape.from_config(cfg)
    batch, seq = 2, 64
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    model = JetMoEForCausalLM(cfg)
    params = list(model.parameters())
    got = saved_bytes(lambda: model(ids, labels=ids), params)
    want = cfg.num_hidden_layers * block_activation_bytes(shape, batch, seq, 4) + head_activation_bytes(
        shape, batch, seq, 4)
    assert want == pytest.approx(got, rel=0.02)

    ckpt = JetMoEForCausalLM(JetMoEConfig.preset("jetmoe_tiny"))
    apply_activation_checkpointing(ckpt.model.layers)
    got_ckpt = saved_bytes(lambda: ckpt(ids, labels=ids), list(ckpt.parameters()))
    want_ckpt = cfg.num_hidden_layers * checkpointed_block_bytes(shape, batch, seq, 4) + head_activation_bytes(
        shape, batch, seq, 4)
    assert want_ckpt == pytest.approx(got_ckpt, rel=0.05)
