"""JetMoE as a DeepSpeed PipelineModule.

Layer list (global indices): 0 embedding, 1..L the blocks, L+1 the final norm, L+2 the head.
The first stage always holds the embedding and the last the norm, head and loss; the blocks are split
by `parallel.partition`. With tied embeddings the embedding and the head are one TiedLayerSpec, so the
first and last stage each hold a copy whose gradients DeepSpeed all-reduces.

Only (hidden, position_ids) cross stage boundaries. Each block attaches its routers' aux loss to its
output's gradient (`attach_aux_loss`) and records the detached values in a `RouterTracker`.
"""

from __future__ import annotations

import contextlib
import io
import zlib
from dataclasses import dataclass

import torch
from deepspeed.runtime.pipe.module import LayerSpec, PipelineModule, TiedLayerSpec
from torch import nn
from torch.nn import functional as F

from jetmoe.model import (
    JetMoEBlock,
    JetMoEConfig,
    attach_aux_loss,
    causal_lm_loss,
    checkpointed,
    init_like_transformers,
    iter_router_losses,
    iter_sparse_layers,
)
from jetmoe.model.layers import RMSNorm
from jetmoe.training.router_stats import RouterTracker
from jetmoe.parallel.topology import Layout, split_blocks

TIED_KEY = "embed"
ROUTER_KINDS = ("moa", "moe")  # index 0: the attention router, 1: the MLP router


@dataclass
class StageContext:
    """Mutable settings shared by the stage's blocks (set by the engine after it knows them)."""

    grad_scale: float = 1.0  # 1 / micro-batches per step: DeepSpeed scales the LM loss the same way
    checkpointing: bool = False


class EmbeddingPipe(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, inputs):
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


def tied_head(embedding: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.embed_tokens.weight)


class HeadPipe(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden):
        return self.lm_head(hidden)


class FinalNormPipe(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)


class BlockPipe(nn.Module):
    def __init__(self, config: JetMoEConfig, layer_idx: int, tracker: RouterTracker, ctx: StageContext):
        super().__init__()
        self.block = JetMoEBlock(config, layer_idx)
        self.layer_idx = layer_idx
        self.aux_loss_coef = config.aux_loss_coef
        self.z_loss_coef = config.z_loss_coef
        # Plain attributes (not submodules): shared by all blocks of the stage.
        self.__dict__["tracker"] = tracker
        self.__dict__["ctx"] = ctx

    def forward(self, inputs):
        hidden, position_ids = inputs
        for _, layer in iter_sparse_layers(self.block):
            layer.router_loss = None
        if self.ctx.checkpointing and self.training and torch.is_grad_enabled():
            hidden = checkpointed(self.block, hidden, position_ids)
        else:
            hidden = self.block(hidden, position_ids)
        losses = list(iter_router_losses(self.block))
        if self.training and torch.is_grad_enabled():
            aux = sum(self.aux_loss_coef * l.balance + self.z_loss_coef * l.z for _, l in losses)
            hidden = attach_aux_loss(hidden, aux, self.ctx.grad_scale)
        if self.training:
            for name, loss in losses:
                self.tracker.record(self.layer_idx, router_kind(name), loss)
        return hidden, position_ids


def router_kind(layer_name: str) -> int:
    return 0 if "attention" in layer_name else 1


def block_weights(config: JetMoEConfig) -> list[int]:
    """Parameter count per block for `partition=parameters`, embedding folded into the first block and
    the (untied) head into the last, since those stages also carry them."""
    block = sum(p.numel() for p in JetMoEBlock(config, 0).parameters())
    weights = [block] * config.num_hidden_layers
    embed = config.vocab_size * config.hidden_size
    weights[0] += embed
    weights[-1] += embed  # the head: a copy of the embedding (tied) or its own matrix; same matmul cost
    return weights


class JetMoEPipeline(PipelineModule):
    """PipelineModule whose stage boundaries come from `split_blocks` (passed as "jetmoe:c0,c1,...")."""

    def _partition_layers(self, method="uniform"):
        counts = [int(c) for c in method.split(":", 1)[1].split(",")]
        parts = [0]
        for s, c in enumerate(counts):
            parts.append(parts[-1] + c + (1 if s == 0 else 0))
        parts[-1] = len(self._layer_specs)  # the last stage also takes the norm and the head
        self.parts = parts
        stage = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    def _synchronize_tied_weights(self):
        # DeepSpeed broadcasts the tied weight with grad mode on, which records c10d::broadcast_ into the
        # parameter's autograd history (torch warns at every backward); a copy needs no history.
        with torch.no_grad():
            super()._synchronize_tied_weights()


def layer_specs(config: JetMoEConfig, tracker: RouterTracker, ctx: StageContext) -> list:
    tied = config.tie_word_embeddings
    embed = (TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, tied_weight_attr=["embed_tokens.weight"])
             if tied else LayerSpec(EmbeddingPipe, config))
    specs = [embed]
    specs += [LayerSpec(BlockPipe, config, i, tracker, ctx) for i in range(config.num_hidden_layers)]
    specs.append(LayerSpec(FinalNormPipe, config))
    if tied:
        specs.append(TiedLayerSpec(TIED_KEY, EmbeddingPipe, config, forward_fn=tied_head,
                                   tied_weight_attr=["embed_tokens.weight"]))
    else:
        specs.append(LayerSpec(HeadPipe, config))
    return specs


def build_pipeline(config: JetMoEConfig, layout: Layout, topology, partition, seed: int,
                   tracker: RouterTracker, ctx: StageContext) -> JetMoEPipeline:
    """This rank's stage of the pipeline, initialised identically for every layout."""
    weights = block_weights(config) if partition == "parameters" else None
    counts = split_blocks(config.num_hidden_layers, layout.pp, partition, weights)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its seed and topology on rank 0
        module = JetMoEPipeline(
            layers=layer_specs(config, tracker, ctx),
            topology=topology,
            loss_fn=causal_lm_loss,
            partition_method="jetmoe:" + ",".join(map(str, counts)),
            activation_checkpoint_interval=0,
        )
    module.block_counts = counts
    module.global_names = global_param_names(module, config)
    init_parameters(module, module.global_names, config, seed)
    return module


def global_param_names(module: PipelineModule, config: JetMoEConfig) -> dict[str, str]:
    """Local parameter name -> transformers' name, for every parameter this stage holds.

    With tied embeddings the first and last stage both map their copy to `model.embed_tokens.weight`;
    the last stage's copy is marked `ds_pipe_replicated` by DeepSpeed (save it once, from stage 0).
    """
    num_layers = config.num_hidden_layers
    names = {}
    for local, _ in module.named_parameters():
        head, rest = local.split(".", 1)
        if head == "tied_modules":
            _, inner = rest.split(".", 1)  # "<key>.embed_tokens.weight"
            names[local] = "model." + inner
            continue
        idx = int(head)
        if idx == 0:
            names[local] = "model." + rest
        elif idx <= num_layers:
            names[local] = f"model.layers.{idx - 1}." + rest.split(".", 1)[1]  # drop "block."
        elif idx == num_layers + 1:
            names[local] = "model." + rest
        else:
            names[local] = rest  # "lm_head.weight"
    return names


@torch.no_grad()
def init_parameters(module: nn.Module, global_names: dict[str, str], config: JetMoEConfig, seed: int) -> None:
    """transformers' scheme (N(0, initializer_range) matrices, ones for norms, zeros for biases), each
    tensor drawn from a generator seeded by (seed, its global name): identical for any pipeline split."""
    std = config.initializer_range
    by_id = {id(p): global_names[n] for n, p in module.named_parameters()}

    def draw_matrix(sub: nn.Module) -> None:
        gen = torch.Generator().manual_seed(_name_seed(seed, by_id[id(sub.weight)]))
        sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen) * std)

    init_like_transformers(module, std, draw_matrix)


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
