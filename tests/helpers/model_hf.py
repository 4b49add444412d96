"""Shared test helpers: transformers' JetMoe built from our config, with our weights."""

from __future__ import annotations

import dataclasses

import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM

OURS_ONLY = {"z_loss_coef", "gradient_checkpointing"}


def hf_config(config: JetMoEConfig):
    from transformers import JetMoeConfig

    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in OURS_ONLY}
    kwargs["rope_parameters"] = config.rope
    hf = JetMoeConfig(**kwargs)
    hf._attn_implementation = "sdpa"
    return hf


def hf_twin(model: JetMoEForCausalLM):
    """transformers' JetMoeForCausalLM holding exactly `model`'s weights (fp32, eval-equivalent)."""
    from transformers import JetMoeForCausalLM

    torch.manual_seed(0)
    hf = JetMoeForCausalLM(hf_config(model.config)).float()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(m == "lm_head.weight" for m in missing), missing
    if not model.config.tie_word_embeddings:
        assert "lm_head.weight" in model.state_dict()
    return hf


def tiny_config(**overrides) -> JetMoEConfig:
    base = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                intermediate_size=24, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=2,
                initializer_range=0.2)
    return JetMoEConfig(**{**base, **overrides})
