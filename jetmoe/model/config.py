"""JetMoE hyper-parameters: transformers' `JetMoeConfig` fields (same names, same defaults) plus ours."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from jetmoe.errors import JetMoEError

DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


@dataclass
class JetMoEConfig:
    # -- transformers' JetMoeConfig, field for field --
    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 12
    num_key_value_heads: int = 16
    kv_channels: int = 128
    intermediate_size: int = 5632
    max_position_embeddings: int = 4096
    activation_function: str = "silu"
    num_local_experts: int = 8  # the GLOBAL expert count of every MoA and MoE layer
    num_experts_per_tok: int = 2
    output_router_logits: bool = False
    aux_loss_coef: float = 0.01
    use_cache: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None  # None means {"rope_type": "default", "rope_theta": 10000.0}
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.01
    attention_dropout: float = 0.0
    # -- ours --
    z_loss_coef: float = 0.001
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.rope_parameters = {**DEFAULT_ROPE, **(self.rope_parameters or {})}
        self.validate()

    # Derived sizes, as transformers derives them.
    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.num_experts_per_tok

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def rope(self) -> dict:
        return self.rope_parameters

    @property
    def rope_theta(self) -> float:
        return float(self.rope["rope_theta"])

    def validate(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_key_value_heads", "kv_channels",
                    "intermediate_size", "max_position_embeddings", "num_local_experts", "num_experts_per_tok")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise JetMoEError(f"model config: {name}={value!r} must be a positive integer")
        if self.num_experts_per_tok > self.num_local_experts:
            raise JetMoEError(
                f"model config: num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts="
                f"{self.num_local_experts}; lower the top-k or add experts")
        if self.kv_channels % 2:
            raise JetMoEError(f"model config: kv_channels={self.kv_channels} must be even (rotary embedding)")
        if self.activation_function != "silu":
            raise JetMoEError(
                f"model config: activation_function={self.activation_function!r} is not supported; use 'silu'")
        if self.rope.get("rope_type") != "default":
            raise JetMoEError(
                f"model config: rope_parameters.rope_type={self.rope.get('rope_type')!r} is not supported; "
                "use 'default'")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise JetMoEError(f"model config: pad_token_id={self.pad_token_id} is outside the vocabulary "
                              f"(vocab_size={self.vocab_size})")

    # -- (de)serialisation --
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "JetMoEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise JetMoEError(
                    f"model config: unknown key {key!r}; valid keys: {', '.join(sorted(known))}")
        d = dict(d)
        if d.get("rope_parameters") is not None:
            d["rope_parameters"] = dict(d["rope_parameters"])
        return cls(**d)

    def replace(self, **changes) -> "JetMoEConfig":
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides) -> "JetMoEConfig":
        if name not in PRESETS:
            raise JetMoEError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # Trains on two CPU cores in minutes; 6 layers split 2/2/2 over a 3-stage pipeline.
    "jetmoe_tiny": dict(
        vocab_size=2048, hidden_size=128, num_hidden_layers=6, num_key_value_heads=4, kv_channels=16,
        intermediate_size=256, max_position_embeddings=512, num_local_experts=4, num_experts_per_tok=2,
        initializer_range=0.02),
    # JetMoE-8B (Shen et al., 2024): 8.5B parameters, 2.2B active.
    "jetmoe_8b": dict(
        vocab_size=32000, hidden_size=2048, num_hidden_layers=24, num_key_value_heads=16, kv_channels=128,
        intermediate_size=5632, max_position_embeddings=4096, num_local_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=True),
}
