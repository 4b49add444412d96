"""bf16 numerics: our model in bf16 strays from its own fp32 result no more than transformers' JetMoe strays
from its fp32 result on the same weights (the router, its gates and the slot sum run in fp32 here)."""

import pytest
import torch

from jetmoe.model import JetMoEForCausalLM
from helpers.model_hf import hf_twin, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _bf16_error(model, ids):
    with torch.no_grad():
        ref = model.float()(ids)
        ref = ref.logits if hasattr(ref, "logits") else ref[0]
        low = model.bfloat16()(ids)
        low = low.logits if hasattr(low, "logits") else low[0]
        model.float()
    return (low.float() - ref).abs().mean().item(), (low.float() - ref).abs().max().item()


def test_bf16_logit_error_no_worse_than_transformers():
    config = tiny_config(hidden_size=64, num_hidden_layers=4, num_local_experts=8, intermediate_size=96,
                         initializer_range=0.1)
    ours_err, hf_err = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        ours = JetMoEForCausalLM(config)
        hf = hf_twin(ours)
        ids = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(seed))
        ours_err.append(_bf16_error(ours, ids))
        hf_err.append(_bf16_error(hf, ids))
    ours_mean = sum(e[0] for e in ours_err) / 3
    hf_mean = sum(e[0] for e in hf_err) / 3
    print(f"mean |bf16 - fp32| logits: ours {ours_mean:.4g}, transformers {hf_mean:.4g}; "
          f"max: ours {[round(e[1], 4) for e in ours_err]}, transformers {[round(e[1], 4) for e in hf_err]}")
    assert ours_mean <= hf_mean
