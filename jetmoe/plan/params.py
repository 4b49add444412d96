"""Parameter counts of JetMoE from its config: whole model, per token, per pipeline stage, per rank.

Shapes follow transformers' JetMoe (per block, D = hidden_size, A = num_key_value_heads * kv_channels,
F = intermediate_size, E = num_local_experts):
  input_layernorm, post_attention_layernorm   D each
  self_attention.kv_proj                      D x 2A
  self_attention.experts (MoA)                bias D, router D x E, input_linear E x A x D, output_linear E x D x A
  mlp (MoE)                                   bias D, router D x E, input_linear E x 2F x D, output_linear E x D x F
plus embed_tokens V x D, the final norm D, and lm_head V x D unless tied to the embedding.
"""

from dataclasses import dataclass
from typing import Any, Mapping

from jetmoe.errors import JetMoEError


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
    """Read `name` from a dataclass/namespace/OmegaConf node or a mapping."""
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    kv_channels: int
    intermediate_size: int
    num_experts: int
    top_k: int
    tied: bool

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelShape":
        try:
            shape = cls(
                vocab_size=int(cfg_get(cfg, "vocab_size")),
                hidden_size=int(cfg_get(cfg, "hidden_size")),
                num_layers=int(cfg_get(cfg, "num_hidden_layers")),
                num_kv_heads=int(cfg_get(cfg, "num_key_value_heads")),
                kv_channels=int(cfg_get(cfg, "kv_channels")),
                intermediate_size=int(cfg_get(cfg, "intermediate_size")),
                num_experts=int(cfg_get(cfg, "num_local_experts")),
                top_k=int(cfg_get(cfg, "num_experts_per_tok")),
                tied=bool(cfg_get(cfg, "tie_word_embeddings", True)),
            )
        except TypeError as e:
            raise JetMoEError(f"model config is missing a size field ({e}); pass a full model=... config") from None
        return shape

    @property
    def attn_size(self) -> int:
        """Width of one attention expert's query (= kv projection size per k/v)."""
        return self.num_kv_heads * self.kv_channels


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one JetMoEBlock, split by how they are held and used."""

    dense: int  # replicated over data parallel ranks, used by every token
    expert: int  # all experts of the block (MoA + MoE); each token uses top_k / E of them
    expert_attention: int  # the MoA share of `expert`

    @property
    def total(self) -> int:
        return self.dense + self.expert


def block_params(m: ModelShape) -> BlockParams:
    D, A, F, E = m.hidden_size, m.attn_size, m.intermediate_size, m.num_experts
    norms = 2 * D
    kv_proj = D * 2 * A
    moa_dense = D + D * E  # bias + router
    moe_dense = D + D * E
    moa_experts = E * (A * D + D * A)
    moe_experts = E * (2 * F * D + D * F)
    return BlockParams(
        dense=norms + kv_proj + moa_dense + moe_dense,
        expert=moa_experts + moe_experts,
        expert_attention=moa_experts,
    )


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # parameters a token's forward pass touches (top_k of E experts per sparse layer)
    embedding: int  # embed_tokens
    head: int  # lm_head when untied, else 0 (the tied head is the embedding)
    final_norm: int
    block: BlockParams
    num_layers: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding - self.head

    @property
    def flops_params(self) -> int:
        """Active parameters that take part in a matmul: the embedding lookup is free, the head is not."""
        return self.active - self.head  # tied or not, the head's V x D matmul counts once


def count_params(model_cfg: Any) -> ParamCounts:
    m = model_cfg if isinstance(model_cfg, ModelShape) else ModelShape.from_config(model_cfg)
    b = block_params(m)
    emb = m.vocab_size * m.hidden_size
    head = 0 if m.tied else emb
    total = emb + head + m.hidden_size + m.num_layers * b.total
    active_block = b.dense + b.expert * m.top_k // m.num_experts
    active = emb + head + m.hidden_size + m.num_layers * active_block
    return ParamCounts(total, active, emb, head, m.hidden_size, b, m.num_layers)
