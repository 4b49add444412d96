"""The planner's parameter counts against transformers' JetMoeForCausalLM (meta device, and one real token)."""

import dataclasses

import pytest
import torch

from jetmoe.model import JetMoEConfig
from jetmoe.plan import count_params

transformers = pytest.importorskip("transformers")


def hf_config(cfg: JetMoEConfig):
    keys = {f.name for f in dataclasses.fields(cfg)} - {"z_loss_coef", "gradient_checkpointing"}
    return transformers.JetMoeConfig(**{k: getattr(cfg, k) for k in keys})


def hf_model(cfg: JetMoEConfig, device: str):
    with torch.device(device):
        return transformers.JetMoeForCausalLM(hf_config(cfg))


def is_expert_tensor(name: str) -> bool:
    return name.endswith(("input_linear.weight", "output_linear.weight"))


CONFIGS = {
    "jetmoe_8b": JetMoEConfig.preset("jetmoe_8b"),
    "jetmoe_tiny": JetMoEConfig.preset("jetmoe_tiny"),
    "tiny_untied_top1": JetMoEConfig.preset("jetmoe_tiny", tie_word_embeddings=False, num_experts_per_tok=1),
    "tiny_odd_shapes": JetMoEConfig.preset(
        "jetmoe_tiny", num_local_experts=6, num_experts_per_tok=3, kv_channels=8, num_key_value_heads=3,
        intermediate_size=96, num_hidden_layers=5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_total_and_active_match_transformers_on_meta(name):
    cfg = CONFIGS[name]
    model = hf_model(cfg, "meta")
    params = dict(model.named_parameters())  # tied weights appear once
    total = sum(p.numel() for p in params.values())
    # active, from the module tree: expert tensors [E, out, in] contribute top_k of their E slices
    active = 0
    for n, p in params.items():
        if is_expert_tensor(n):
            assert p.shape[0] == cfg.num_local_experts, n
            active += p.numel() // p.shape[0] * cfg.num_experts_per_tok
        else:
            active += p.numel()
    counts = count_params(cfg)
    assert counts.total == total
    assert counts.active == active
    assert counts.embedding == model.model.embed_tokens.weight.numel()


@pytest.mark.parametrize("name", ["jetmoe_tiny", "tiny_odd_shapes"])
def test_active_equals_parameters_one_token_uses(name):
    """One token through a real transformers model: each expert matmul reports how many rows every
    expert received; the experts that got a row are the ones the token used."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = hf_model(cfg, "cpu")
    used = {}

    def record(module, args, _out):
        sizes = torch.as_tensor(args[1])  # JetMoeParallelExperts.forward(inputs, expert_size)
        used[module] = int((sizes > 0).sum())

    experts = [m for m in model.modules() if type(m).__name__ == "JetMoeParallelExperts"]
    assert len(experts) == 4 * cfg.num_hidden_layers
    for m in experts:
        m.register_forward_hook(record)
    with torch.no_grad():
        model(input_ids=torch.tensor([[7]]))
    touched = sum(p.numel() for n, p in model.named_parameters() if not is_expert_tensor(n))
    for m in experts:
        assert used[m] == cfg.num_experts_per_tok
        touched += used[m] * m.weight[0].numel()
    assert count_params(cfg).active == touched


def test_8b_is_the_papers_size():
    c = count_params(CONFIGS["jetmoe_8b"])
    assert 8.0e9 < c.total < 9.0e9  # "8B parameters"
    assert 2.1e9 < c.active - c.embedding < 2.4e9  # "2.2B active"
