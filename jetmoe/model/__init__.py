"""The JetMoE model: config, sparse layers (MoA, MoE), router losses, the objective, transformers-format I/O."""

from jetmoe.model.config import PRESETS, JetMoEConfig
from jetmoe.model.experts import GroupedExperts, LocalDispatcher, LocalPlan, grouped_linear
from jetmoe.model.attention import MoA
from jetmoe.model.moe import MoE, SparseLayer
from jetmoe.model.router import RouterLoss, TopKRouter, router_loss
from jetmoe.model.loss import (
    attach_aux_loss, aux_loss, causal_lm_loss, linear_causal_lm_loss, shift_labels, sum_router_losses)
from jetmoe.model.model import (
    ATTENTION,
    MLP,
    JetMoEBlock,
    JetMoEForCausalLM,
    JetMoEModel,
    JetMoEOutput,
    ROUTER_KINDS,
    block_inputs,
    init_like_transformers,
    iter_sparse_layers,
    make_embedding,
    make_final_norm,
    make_lm_head,
    set_document_mask,
)

__all__ = [
    "PRESETS", "JetMoEConfig", "GroupedExperts", "LocalDispatcher", "LocalPlan", "grouped_linear", "MoA", "MoE",
    "SparseLayer", "RouterLoss", "TopKRouter", "router_loss", "attach_aux_loss", "aux_loss", "causal_lm_loss",
    "linear_causal_lm_loss", "shift_labels", "sum_router_losses", "ATTENTION", "MLP", "ROUTER_KINDS", "block_inputs",
    "JetMoEBlock", "JetMoEForCausalLM", "JetMoEModel", "JetMoEOutput", "init_like_transformers", "iter_sparse_layers",
    "make_embedding", "make_final_norm", "make_lm_head", "set_document_mask",
]
