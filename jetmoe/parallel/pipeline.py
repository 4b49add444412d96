"""JetMoE as a DeepSpeed PipelineModule, built from the model's own modules.

Layer list (global indices): 0 embedding, 1..L the blocks, L+1 the final norm, L+2 the head. The first
stage always holds the embedding and the last the norm, head and loss (the head's
matmul runs inside the chunked loss, `head_loss`: no [tokens, vocab] logits); the blocks are split by
`parallel.partition`. With tied embeddings the embedding and the head are one TiedLayerSpec, so the first
and last stage each hold a copy whose gradients DeepSpeed all-reduces.

Each stage layer is a thin adapter of the `(hidden, position_ids)` tuple that crosses stages around one of
the model's modules, held under the same attribute path as in `JetMoEForCausalLM` below `model_prefix`:
transformers' name of any parameter is `model_prefix + its name inside the adapter`. LayerSpecs make each
rank build only its own stage. A block attaches its routers' aux loss to its output's gradient
(`attach_aux_loss`) and hands the detached losses to `on_router_loss`: nothing else crosses a stage. The first
block of a stage computes the rotary angles and the attention mask once (`block_inputs`) and hands them on to the
stage's other blocks beside the tuple; the last block of the stage drops them again.
"""

from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from jetmoe.model import (
    ROUTER_KINDS,
    JetMoEBlock,
    JetMoEConfig,
    RouterLoss,
    attach_aux_loss,
    aux_loss,
    block_inputs,
    init_like_transformers,
    linear_causal_lm_loss,
    make_embedding,
    make_final_norm,
    make_lm_head,
)
from jetmoe.model.experts import GroupedExperts
from jetmoe.parallel.compile import compile_blocks
from jetmoe.parallel.deepspeed_internals import BlockCountPipelineModule
from jetmoe.parallel.topology import Layout, split_blocks

TIED_KEY = "embed"
# on_router_loss(layer index, router index in ROUTER_KINDS, detached losses of one micro-batch)
RouterLossHook = Callable[[int, int, RouterLoss], None]
# rebalance(layer index, router index, losses of one micro-batch) -> the losses to train on (e.g. another balance term)
RebalanceHook = Callable[[int, int, RouterLoss], RouterLoss]


class EmbeddingStage(nn.Module):
    model_prefix = "model."

    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.embed_tokens = make_embedding(config)

    def forward(self, inputs):
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


def tied_head(embedding: EmbeddingStage, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden, embedding.embed_tokens.weight


def head_loss(outputs: tuple[torch.Tensor, torch.Tensor], shifted_labels: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's loss_fn on the last stage: the head stage hands over (final hidden states, head weight) and the
    head runs inside the chunked loss, so the stage never holds the [tokens, vocab] logits."""
    hidden, weight = outputs
    return linear_causal_lm_loss(hidden, weight, shifted_labels)


def stage_logits(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The full logits from the last stage's outputs (inference, checks)."""
    hidden, weight = outputs
    return F.linear(hidden, weight)


class BlockStage(nn.Module):
    model_prefix = "model."

    def __init__(self, config: JetMoEConfig, layer_idx: int, grad_scale: float, on_router_loss: RouterLossHook | None,
                 document_mask: str = "off", opens_stage: bool = True, closes_stage: bool = True):
        """grad_scale: 1 / micro-batches per step, the scale DeepSpeed applies to the LM loss's gradient.
        opens_stage / closes_stage: the first / last block of its pipeline stage."""
        super().__init__()
        self.layers = nn.ModuleDict({str(layer_idx): JetMoEBlock(config, layer_idx)})
        self.layer_idx = layer_idx
        self.config = config
        self.document_mask = document_mask
        self.opens_stage, self.closes_stage = opens_stage, closes_stage
        self.coefs = (config.aux_loss_coef, config.z_loss_coef)
        self.grad_scale = grad_scale
        self.on_router_loss = on_router_loss
        self.rebalance: RebalanceHook | None = None  # set from outside (jetmoe.training.global_balance)

    @property
    def block(self) -> JetMoEBlock:
        return self.layers[str(self.layer_idx)]

    def forward(self, inputs):
        if self.opens_stage:
            hidden, position_ids = inputs
            shared = block_inputs(self.config, hidden, position_ids, self.document_mask)  # (rope, mask)
        else:
            hidden, position_ids, shared = inputs
        hidden, losses = self.block(hidden, *shared)
        if self.rebalance is not None:
            losses = tuple(self.rebalance(self.layer_idx, router, loss) for router, loss in enumerate(losses))
        if self.training and torch.is_grad_enabled():
            aux = sum(aux_loss(l.balance, l.z, *self.coefs) for l in losses)
            hidden = attach_aux_loss(hidden, aux, self.grad_scale)
        if self.training and self.on_router_loss is not None:
            for router, loss in enumerate(losses):
                self.on_router_loss(self.layer_idx, router, RouterLoss(*(t.detach() for t in loss)))
        return (hidden, position_ids) if self.closes_stage else (hidden, position_ids, shared)


class FinalNormStage(nn.Module):
    model_prefix = "model."

    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.norm = make_final_norm(config)

    def forward(self, inputs):
        hidden, _ = inputs
        return self.norm(hidden)


class HeadStage(nn.Module):
    model_prefix = ""

    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.lm_head = make_lm_head(config)

    def forward(self, hidden):
        return hidden, self.lm_head.weight  # the head's matmul runs inside head_loss, chunk by chunk


def block_weights(config: JetMoEConfig, partition: str = "parameters", seq_len: int | None = None) -> list[int]:
    """One weight per block for a balanced partition, the embedding folded into the first block's and the head
    into the last block's, since those stages also carry them.
    parameters: parameter counts (memory balance).
    flops: training FLOPs per token (work balance): 6 x active matmul parameters + causal attention, counted as
    jetmoe.plan.throughput counts them; the head's 6 x vocab x hidden matmul on the last block, nothing for the
    embedding lookup."""
    with torch.device("meta"):  # shapes only
        block = JetMoEBlock(config, 0)
    total = sum(p.numel() for p in block.parameters())
    embed = config.vocab_size * config.hidden_size
    if partition == "flops":
        if seq_len is None:
            raise ValueError("partition=flops needs the sequence length")
        expert = sum(m.weight.numel() for m in block.modules() if isinstance(m, GroupedExperts))
        k, e = config.num_experts_per_tok, config.num_local_experts
        attention = 6 * seq_len * config.num_key_value_heads * config.kv_channels * k
        weights = [6 * (total - expert + expert * k // e) + attention] * config.num_hidden_layers
        weights[-1] += 6 * (embed + config.hidden_size)  # the head and the final norm; the lookup is no matmul
        return weights
    weights = [total] * config.num_hidden_layers
    weights[0] += embed
    weights[-1] += embed  # the head: a copy of the embedding (tied) or its own matrix; same matmul cost
    return weights


def _on_device(spec_class):
    """A LayerSpec class whose layer is allocated directly on `device` in `dtype`, uninitialised (the stage's
    init fills every parameter): a GPU rank never holds an fp32 copy of its stage on the host."""

    class OnDevice(spec_class):
        def __init__(self, device, dtype, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.device, self.dtype = device, dtype

        def build(self, log=False):
            with torch.device("meta"):
                layer = super().build(log)
            return layer.to(self.dtype).to_empty(device=self.device)

    OnDevice.__name__ = OnDevice.__qualname__ = f"OnDevice{spec_class.__name__}"
    return OnDevice


def layer_specs(config: JetMoEConfig, grad_scale: float, on_router_loss: RouterLossHook | None,
                device: torch.device, dtype: torch.dtype, block_counts: list[int], document_mask: str = "off") -> list:
    from deepspeed.runtime.pipe.module import LayerSpec, TiedLayerSpec

    layer, tied_layer = _on_device(LayerSpec), _on_device(TiedLayerSpec)
    at = (device, dtype)
    ends = [sum(block_counts[:s + 1]) for s in range(len(block_counts))]  # one past each stage's last block
    tied = config.tie_word_embeddings
    embed = (tied_layer(*at, TIED_KEY, EmbeddingStage, config, tied_weight_attr=["embed_tokens.weight"])
             if tied else layer(*at, EmbeddingStage, config))
    specs = [embed]
    specs += [layer(*at, BlockStage, config, i, grad_scale, on_router_loss, document_mask, i == 0 or i in ends,
                    i + 1 in ends) for i in range(config.num_hidden_layers)]
    specs.append(layer(*at, FinalNormStage, config))
    if tied:
        specs.append(tied_layer(*at, TIED_KEY, EmbeddingStage, config, forward_fn=tied_head,
                                tied_weight_attr=["embed_tokens.weight"]))
    else:
        specs.append(layer(*at, HeadStage, config))
    return specs


def build_pipeline(config: JetMoEConfig, layout: Layout, topology, partition, seed: int, grad_scale: float = 1.0,
                   on_router_loss: RouterLossHook | None = None, document_mask: bool = False, compile: bool = False,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seq_len: int | None = None):
    """This rank's stage of the pipeline, built on `device` in `dtype` and initialised identically for every
    layout. `compile`: each block's parts through torch.compile (jetmoe.parallel.compile); activation recompute,
    applied later, wraps them."""
    weights = block_weights(config, partition, seq_len) if partition in ("parameters", "flops") else None
    counts = split_blocks(config.num_hidden_layers, layout.pp, partition, weights)
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its seed and topology on rank 0
        module = BlockCountPipelineModule(
            counts,
            layers=layer_specs(config, grad_scale, on_router_loss, torch.device(device), dtype, counts,
                               "on" if document_mask else "off"),
            topology=topology,
            loss_fn=head_loss,
            activation_checkpoint_interval=0,
        )
    module.block_counts = counts
    module.global_names = global_param_names(module)
    init_like_transformers(module, config.initializer_range, seed, module.global_names)
    if compile:
        compile_blocks(stage_blocks(module))
    return module


def stage_blocks(module: nn.Module) -> list[JetMoEBlock]:
    """The model blocks this stage holds."""
    return [m.block for m in module.modules() if isinstance(m, BlockStage)]


def stage_layers(module: nn.Module) -> dict[str, nn.Module]:
    """{local name prefix: stage adapter} for the layers this rank holds (tied ones under tied_modules)."""
    out = {}
    for head, child in module.named_children():
        if head == "tied_modules":
            out.update({f"tied_modules.{key}.": tied for key, tied in child.items()})
        elif hasattr(child, "model_prefix"):
            out[f"{head}."] = child
    return out


def global_param_names(module: nn.Module) -> dict[str, str]:
    """Local parameter name -> transformers' name, for every parameter this stage holds.

    With tied embeddings the first and last stage both map their copy to `model.embed_tokens.weight`;
    the last stage's copy is marked `ds_pipe_replicated` by DeepSpeed (save it once, from stage 0).
    """
    return {local + name: layer.model_prefix + name
            for local, layer in stage_layers(module).items() for name, _ in layer.named_parameters()}
