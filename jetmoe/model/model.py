"""JetMoE (Shen et al., 2024): a decoder whose attention (MoA) and MLP (MoE) are both sparse mixtures.

    block(x) = x + MoA(norm1(x));  x + MoE(norm2(x))
    logits   = lm_head(norm(blocks(embed(ids))))
    loss     = lm_loss + aux_loss_coef * sum_r balance_r + z_loss_coef * sum_r z_r   (r: every router)

Every sparse layer returns its router losses with its output; the model keeps no per-step state. The rotary
angles and the attention mask depend on the positions alone: `block_inputs` computes them once per forward (of
the model, or of a pipeline stage) and every block receives them. Parallelism (pipeline stages, expert dispatch,
activation recompute) wraps these modules from outside.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from jetmoe.errors import JetMoEError
from jetmoe.model.attention import MoA
from jetmoe.model.config import JetMoEConfig
from jetmoe.model.experts import GroupedExperts
from jetmoe.model.layers import RMSNorm, default_position_ids, rotary_cos_sin
from jetmoe.model.loss import aux_loss, causal_lm_loss, shift_labels, sum_router_losses
from jetmoe.model.masking import MODES, attention_mask
from jetmoe.model.moe import MoE, SparseLayer
from jetmoe.model.router import RouterLoss

# transformers builds both block norms with its RMSNorm default eps, not config.rms_norm_eps (which only
# the final norm uses). Kept so that checkpoints behave identically in both libraries.
BLOCK_NORM_EPS = 1e-6
# A block's sparse layers, in the order its forward returns their router losses: transformers' module names, and
# the router kinds that statistics and plots are keyed by.
ATTENTION, MLP = "self_attention", "mlp"
ROUTER_KINDS = ("moa", "moe")


class JetMoEBlock(nn.Module):
    def __init__(self, config: JetMoEConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_theta
        self.input_layernorm = RMSNorm(config.hidden_size, BLOCK_NORM_EPS)
        self.self_attention = MoA(config.hidden_size, config.num_key_value_heads, config.kv_channels,
                                  config.num_local_experts, config.num_experts_per_tok, config.attention_dropout)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, BLOCK_NORM_EPS)
        self.mlp = MoE(config.hidden_size, config.intermediate_size, config.num_local_experts,
                       config.num_experts_per_tok)

    def forward(self, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask=None
                ) -> tuple[torch.Tensor, tuple[RouterLoss, RouterLoss]]:
        """(new hidden, (the MoA router's losses, the MoE router's losses)). rope and mask come from `block_inputs`
        (the model computes them once for all its blocks); a block called on its own with neither attends causally
        over positions 0..T-1. What train.compile compiles: the angles come in as inputs (traced inside, Inductor
        would recompute pow/sin/cos for every element)."""
        if rope is None:
            rope = rotary_cos_sin(default_position_ids(hidden.shape[0], hidden.shape[1], hidden.device),
                                  self.head_dim, self.rope_theta, hidden.dtype)
        attended, attention_loss = self.self_attention(self.input_layernorm(hidden), rope, mask)
        hidden = hidden + attended
        mixed, mlp_loss = self.mlp(self.post_attention_layernorm(hidden))
        return hidden + mixed, (attention_loss, mlp_loss)


def block_inputs(config: JetMoEConfig, hidden: torch.Tensor, position_ids: torch.Tensor | None,
                 document_mask: str = "auto"):
    """(rope, mask) shared by every block of one forward: the rotary (cos, sin) of the positions (0..T-1 when
    None) and the attention mask that `document_mask` asks for (jetmoe.model.masking; None: plain causal)."""
    mask = attention_mask(position_ids, document_mask)
    if position_ids is None:
        position_ids = default_position_ids(hidden.shape[0], hidden.shape[1], hidden.device)
    return rotary_cos_sin(position_ids, config.head_dim, config.rope_theta, hidden.dtype), mask


def set_document_mask(model: nn.Module, mode: str | bool) -> None:
    """How the model (every JetMoEModel inside `model`) masks documents: True/"on", False/"off" or "auto"."""
    mode = {True: "on", False: "off"}.get(mode, mode)
    if mode not in MODES:
        raise JetMoEError(f"document_mask={mode!r} is unknown; use one of {', '.join(MODES)}")
    for sub in model.modules():
        if isinstance(sub, JetMoEModel):
            sub.document_mask = mode


# The parts outside the blocks, built the same way by the model and by a pipeline stage.
def make_embedding(config: JetMoEConfig) -> nn.Embedding:
    return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)


def make_final_norm(config: JetMoEConfig) -> RMSNorm:
    return RMSNorm(config.hidden_size, config.rms_norm_eps)


def make_lm_head(config: JetMoEConfig) -> nn.Linear:
    return nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class JetMoEModel(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = make_embedding(config)
        self.layers = nn.ModuleList(JetMoEBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_final_norm(config)
        self.document_mask = "auto"  # "auto", "on" or "off": see jetmoe.model.masking (set_document_mask)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, RouterLoss]]:
        """(final hidden states, {sparse layer name: its router losses})."""
        hidden = self.embed_tokens(input_ids)
        rope, mask = block_inputs(self.config, hidden, position_ids, self.document_mask)
        router_losses = {}
        for i, block in enumerate(self.layers):
            hidden, (attention_loss, mlp_loss) = block(hidden, rope, mask)
            router_losses[f"model.layers.{i}.{ATTENTION}"] = attention_loss
            router_losses[f"model.layers.{i}.{MLP}"] = mlp_loss
        return self.norm(hidden), router_losses


@dataclass
class JetMoEOutput:
    logits: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    lm_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    router_losses: dict[str, RouterLoss] = field(default_factory=dict)  # sparse layer name -> its losses


def iter_sparse_layers(module: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    for name, sub in module.named_modules():
        if isinstance(sub, SparseLayer):
            yield name, sub


def name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


@torch.no_grad()
def init_like_transformers(module: nn.Module, std: float, seed: int, global_names: dict[str, str] | None = None) -> None:
    """transformers' scheme: N(0, std) for matrices, ones for norms, zeros for biases.

    Each matrix is drawn from a generator seeded by (seed, its transformers name), so a tensor gets the same
    values whichever module holds it: the whole model or any pipeline stage of any layout. `global_names`
    maps the module's parameter names to transformers' names (default: they are already)."""
    names = {id(p): (global_names[n] if global_names else n) for n, p in module.named_parameters()}
    drawn = set()  # a tied matrix is drawn once (a second draw would undo the embedding's zeroed padding row)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding, GroupedExperts)) and id(sub.weight) not in drawn:
            if sub.weight.is_meta:  # a skeleton (from_pretrained) gets its values from the files
                continue
            drawn.add(id(sub.weight))
            # Drawn where the weight lives (a GPU stage never holds an fp32 copy on the host); in fp32, then rounded
            # to the weight's dtype. CPU draws are the reference; a CUDA generator gives other, equally seeded values.
            device = sub.weight.device
            gen = torch.Generator(device=device).manual_seed(name_seed(seed, names[id(sub.weight)]))
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=gen, device=device) * std)
        if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
            sub.weight[sub.padding_idx].zero_()
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
        if isinstance(sub, SparseLayer):
            sub.bias.zero_()


class JetMoEForCausalLM(nn.Module):
    def __init__(self, config: JetMoEConfig, seed: int | None = None):
        """`seed` fixes the initial weights (the trainer's train.seed gives the same weights for every layout);
        by default it is drawn from torch's global generator, so torch.manual_seed makes the model reproducible."""
        super().__init__()
        self.config = config
        self.model = JetMoEModel(config)
        self.lm_head = make_lm_head(config)
        self.tie_weights()
        self.init_weights(int(torch.randint(2**62, (), device="cpu")) if seed is None else seed)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, seed: int) -> None:
        init_like_transformers(self, self.config.initializer_range, seed)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> JetMoEOutput:
        hidden, router_losses = self.model(input_ids, position_ids)
        logits = self.lm_head(hidden)
        balance, z = sum_router_losses(router_losses.values())
        aux = aux_loss(balance, z, self.config.aux_loss_coef, self.config.z_loss_coef)
        out = JetMoEOutput(logits=logits, balance_loss=balance, z_loss=z, aux_loss=aux, router_losses=router_losses)
        if labels is not None:
            out.lm_loss = causal_lm_loss(logits, shift_labels(labels))
            out.loss = out.lm_loss + aux
        return out

    # -- transformers-format I/O (jetmoe/model/hf_io.py) --
    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu") -> "JetMoEForCausalLM":
        from jetmoe.model.hf_io import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> None:
        from jetmoe.model.hf_io import save_pretrained
        save_pretrained(self, path, max_shard_size=max_shard_size, dtype=dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
