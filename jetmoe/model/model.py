"""JetMoE (Shen et al., 2024): a decoder whose attention (MoA) and MLP (MoE) are both sparse mixtures.

    block(x) = x + MoA(norm1(x));  x + MoE(norm2(x))
    logits   = lm_head(norm(blocks(embed(ids))))
    loss     = lm_loss + aux_loss_coef * sum_r balance_r + z_loss_coef * sum_r z_r   (r: every router)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from jetmoe.model.attention import MoA
from jetmoe.model.config import JetMoEConfig
from jetmoe.model.experts import GroupedExperts
from jetmoe.model.layers import RMSNorm, default_position_ids, rotary_cos_sin
from jetmoe.model.masking import attention_mask
from jetmoe.model.moe import MoE, SparseLayer
from jetmoe.model.router import RouterLoss

# transformers builds both block norms with its RMSNorm default eps, not config.rms_norm_eps (which only
# the final norm uses). Kept so that checkpoints behave identically in both libraries.
BLOCK_NORM_EPS = 1e-6


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

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask(position_ids, self.self_attention.document_mask)  # None position ids: causal
        if position_ids is None:
            position_ids = default_position_ids(hidden.shape[0], hidden.shape[1], hidden.device)
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, hidden.dtype)
        hidden = hidden + self.self_attention(self.input_layernorm(hidden), cos, sin, mask)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


def checkpointed(block: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """Run a block keeping only its input; its activations are recomputed in backward."""
    return checkpoint(block, hidden, position_ids, use_reentrant=False)


class JetMoEModel(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(JetMoEBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for block in self.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = checkpointed(block, hidden, position_ids)
            else:
                hidden = block(hidden, position_ids)
        return self.norm(hidden)


@dataclass
class JetMoEOutput:
    logits: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    aux_loss: torch.Tensor
    lm_loss: torch.Tensor | None = None
    loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) over the positions whose label is not -100; labels already shifted."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=-100)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers' convention: position t predicts labels[t + 1]; the last position predicts nothing."""
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def iter_sparse_layers(module: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    for name, sub in module.named_modules():
        if isinstance(sub, SparseLayer):
            yield name, sub


def iter_router_losses(module: nn.Module) -> Iterator[tuple[str, RouterLoss]]:
    """(layer name, RouterLoss of its last forward) for every sparse layer inside `module` that has run."""
    for name, layer in iter_sparse_layers(module):
        if layer.router_loss is not None:
            yield name, layer.router_loss


def sum_router_losses(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    losses = [loss for _, loss in iter_router_losses(module)]
    if not losses:
        zero = torch.zeros(())
        return zero, zero
    return torch.stack([l.balance for l in losses]).sum(), torch.stack([l.z for l in losses]).sum()


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, aux, grad_scale):
        ctx.grad_scale = grad_scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden):
        shape, dtype, device = ctx.aux_meta
        return grad_hidden, torch.full(shape, ctx.grad_scale, dtype=dtype, device=device), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, grad_scale: float = 1.0) -> torch.Tensor:
    """Identity on `hidden`; in backward, `aux` receives gradient `grad_scale` as if `grad_scale * aux` had
    been added to the loss. Lets a pipeline stage train its router losses while sending only hidden states."""
    return _AttachAuxLoss.apply(hidden, aux, grad_scale)


@torch.no_grad()
def init_like_transformers(module: nn.Module, std: float,
                           draw_matrix: Callable[[nn.Module], None] | None = None) -> None:
    """transformers' initialisation of every submodule: N(0, std) for matrices, ones for norms, zeros for
    biases. `draw_matrix(sub)` fills a matrix's weight; by default it draws from torch's global generator."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding, GroupedExperts)):
            if draw_matrix is None:
                sub.weight.normal_(0.0, std)
            else:
                draw_matrix(sub)
        if isinstance(sub, nn.Embedding) and sub.padding_idx is not None:
            sub.weight[sub.padding_idx].zero_()
        if isinstance(sub, RMSNorm):
            sub.weight.fill_(1.0)
        if isinstance(sub, SparseLayer):
            sub.bias.zero_()


class JetMoEForCausalLM(nn.Module):
    def __init__(self, config: JetMoEConfig):
        super().__init__()
        self.config = config
        self.model = JetMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        init_like_transformers(self, self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> JetMoEOutput:
        for _, layer in iter_sparse_layers(self):
            layer.router_loss = None
        logits = self.lm_head(self.model(input_ids, position_ids))
        balance, z = sum_router_losses(self)
        aux = self.config.aux_loss_coef * balance + self.config.z_loss_coef * z
        out = JetMoEOutput(logits=logits, balance_loss=balance, z_loss=z, aux_loss=aux)
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
