"""The JetMoE model: config, sparse layers (MoA, MoE), router losses, transformers-format I/O."""

from jetmoe.model.config import PRESETS, JetMoEConfig
from jetmoe.model.experts import GroupedExperts, LocalDispatcher, LocalPlan, grouped_linear
from jetmoe.model.attention import MoA
from jetmoe.model.masking import set_document_mask
from jetmoe.model.moe import MoE, SparseLayer
from jetmoe.model.router import RouterLoss, TopKRouter, router_loss
from jetmoe.model.model import (
    JetMoEBlock,
    JetMoEForCausalLM,
    JetMoEModel,
    JetMoEOutput,
    attach_aux_loss,
    causal_lm_loss,
    checkpointed,
    init_like_transformers,
    iter_router_losses,
    iter_sparse_layers,
    shift_labels,
    sum_router_losses,
)

__all__ = [
    "PRESETS", "JetMoEConfig", "GroupedExperts", "LocalDispatcher", "LocalPlan", "grouped_linear", "MoA", "MoE",
    "SparseLayer", "RouterLoss", "TopKRouter", "router_loss", "JetMoEBlock", "JetMoEForCausalLM", "JetMoEModel",
    "JetMoEOutput", "attach_aux_loss", "causal_lm_loss", "checkpointed", "init_like_transformers", "iter_router_losses",
    "iter_sparse_layers", "set_document_mask", "shift_labels", "sum_router_losses",
]
