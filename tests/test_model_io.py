"""transformers-format directories, both ways; config and weight errors that name the problem."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jetmoe.errors import JetMoEError
from jetmoe.model import JetMoEConfig, JetMoEForCausalLM
from helpers.model_hf import hf_config, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits


@pytest.mark.parametrize("tied,shard", [(True, None), (False, 30_000)])
def test_ours_to_transformers_and_back(tmp_path, ids, tied, shard):
    from transformers import JetMoeForCausalLM as HF

    model = JetMoEForCausalLM(tiny_config(tie_word_embeddings=tied, z_loss_coef=0.005))
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (tmp_path / "model.safetensors").exists()
    hf = HF.from_pretrained(tmp_path, attn_implementation="sdpa")
    torch.testing.assert_close(logits(hf, ids), logits(model, ids), rtol=1e-5, atol=1e-5)

    back = JetMoEForCausalLM.from_pretrained(tmp_path)
    assert back.config == model.config.replace(gradient_checkpointing=False)
    assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=0)


def test_transformers_directory_loads(tmp_path, ids):
    from transformers import JetMoeForCausalLM as HF

    torch.manual_seed(0)
    config = tiny_config(tie_word_embeddings=False, num_experts_per_tok=3)
    hf = HF(hf_config(config))
    hf.save_pretrained(tmp_path)
    ours = JetMoEForCausalLM.from_pretrained(tmp_path)
    assert ours.config.num_experts_per_tok == 3 and not ours.config.tie_word_embeddings
    torch.testing.assert_close(logits(ours, ids), logits(hf, ids), rtol=1e-5, atol=1e-5)


def test_bf16_round_trip(tmp_path, ids):
    model = JetMoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = JetMoEForCausalLM.from_pretrained(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    for (n, p), q in zip(model.named_parameters(), back.parameters()):
        assert torch.equal(p.bfloat16(), q), n
    as_fp32 = JetMoEForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert as_fp32.model.norm.weight.dtype == torch.float32
    assert logits(back, ids).dtype == torch.bfloat16


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(JetMoEError, match="hiden_size"):
        JetMoEConfig.from_dict({"hiden_size": 64})
    with pytest.raises(JetMoEError, match="num_experts_per_tok"):
        JetMoEConfig(num_local_experts=2, num_experts_per_tok=3)
    with pytest.raises(JetMoEError, match="jetmoe_tiny"):
        JetMoEConfig.preset("jetmoe_huge")
    model = JetMoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_experts": 4}))
    with pytest.raises(JetMoEError, match="n_experts"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 5}))
    with pytest.raises(JetMoEError, match="num_attention_heads"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(JetMoEError, match="config.json"):
        JetMoEForCausalLM.from_pretrained(tmp_path / "nowhere")


def test_weight_errors_name_the_tensor(tmp_path):
    model = JetMoEForCausalLM(tiny_config())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 20}))
    with pytest.raises(JetMoEError, match=r"model\.layers\.0\.mlp\.input_linear\.weight.*\(4, 48, 32\).*\(4, 40, 32\)"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(tmp_path / "model.safetensors")
    save_file(weights, tmp_path / "complete.safetensors")
    del weights["model.layers.1.self_attention.kv_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(JetMoEError, match=r"model\.layers\.1\.self_attention\.kv_proj\.weight"):
        JetMoEForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "complete.safetensors").rename(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    with pytest.raises(JetMoEError, match="lm_head.weight"):
        JetMoEForCausalLM.from_pretrained(tmp_path)


def test_presets():
    tiny = JetMoEConfig.preset("jetmoe_tiny")
    assert tiny.num_hidden_layers % 3 == 0 and tiny.num_attention_heads == 8
    with torch.device("meta"):
        big = JetMoEForCausalLM(JetMoEConfig.preset("jetmoe_8b"))
    # JetMoE-8B: 8.5B parameters in total (paper, table 1)
    assert 8.4e9 < big.num_parameters() < 8.6e9
    assert JetMoEConfig.from_dict(tiny.to_dict()) == tiny
    assert JetMoEConfig.preset("jetmoe_tiny", num_hidden_layers=3).num_hidden_layers == 3
