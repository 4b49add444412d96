"""The `data` section of the training config (its paths are resolved by jetmoe.paths)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from jetmoe.errors import JetMoEError

SOURCES = ("builtin", "files", "hub", "mixture")
TXT_SAMPLE_BY = ("document", "paragraph", "line")


@dataclass
class DataConfig:
    name: str = "builtin"  # builtin | files | hub | mixture
    path: Any = None  # files: a file, glob, directory or a list of them; hub: dataset name or local dataset dir
    text_field: str = "text"  # column holding the text (jsonl/json/parquet/hub)
    hub_config: Optional[str] = None  # hub: dataset config (subset) name
    split: str = "train"  # hub: split to read
    txt_sample_by: str = "document"  # .txt: one document per file | per blank-line block (paragraph) | per line
    seq_len: int = 256  # tokens per sample; windows hold seq_len + 1 tokens
    tokenizer: str = "builtin"  # builtin | local path | hub name
    streaming: bool = False  # read the source as a stream into the token cache
    max_tokens: Optional[int] = None  # stop reading the source after this many tokens
    document_mask: bool = False  # position ids restart after each EOS, so attention stays inside documents
    cache_dir: Optional[str] = None  # None: $JETMOE_CACHE_DIR or ~/.cache/jetmoe
    num_proc: Optional[int] = None  # tokenizer processes; None: 1 for small sources, else min(cpus, 8)
    valid_fraction: float = 0.02  # share of packed windows held out for eval (every k-th window); 0: none
    # data=mixture (jetmoe/data/mixture_config.py): named sources, optional phases, the shard size
    sources: dict = field(default_factory=dict)  # name -> {path, text_field, weight[, hub_config, split]}
    phases: list = field(default_factory=list)  # [{start_step, weights: {name: w}}]; empty: the sources' weights
    shard_tokens: int = 1 << 27  # pre-tokenized shard size (a shard closes at the next document end)
    verify: str = "size"  # data=mixture, at open: size (a stat per shard) | full (read every shard's crc32)
    require_tokenizer: bool = False  # a recipe made for a given vocabulary: data.tokenizer=builtin is an error

    @classmethod
    def from_any(cls, cfg) -> "DataConfig":
        """Accept a DataConfig, a dict or an OmegaConf node (the trainer's `data` section)."""
        if isinstance(cfg, cls):
            return cfg
        if not isinstance(cfg, dict):
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise JetMoEError(f"unknown data config key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**cfg)

    def validate(self, max_position_embeddings: int) -> None:
        if self.name not in SOURCES:
            raise JetMoEError(f"data.name={self.name!r} is unknown; use one of {', '.join(SOURCES)}")
        if self.name not in ("builtin", "mixture") and not self.path:
            raise JetMoEError(f"data.path is not set; data={self.name} needs data.path=<file, glob or list>")
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise JetMoEError(f"data.seq_len={self.seq_len!r} must be a positive integer")
        if self.seq_len > max_position_embeddings:
            raise JetMoEError(
                f"data.seq_len={self.seq_len} exceeds the model's max_position_embeddings={max_position_embeddings}; "
                f"lower data.seq_len or raise model.max_position_embeddings"
            )
        if not 0.0 <= self.valid_fraction <= 0.5:
            raise JetMoEError(f"data.valid_fraction={self.valid_fraction} must lie in [0, 0.5]")
        if self.txt_sample_by not in TXT_SAMPLE_BY:
            raise JetMoEError(f"data.txt_sample_by={self.txt_sample_by!r} is unknown; use one of {TXT_SAMPLE_BY}")
        if self.require_tokenizer and self.tokenizer in (None, "", "builtin", "???"):
            raise JetMoEError("data.tokenizer must be set for this data config (a tokenizer directory or "
                              "tokenizer.json matching model.vocab_size, e.g. Llama-2's 32k): data.tokenizer=PATH")
        if not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            raise JetMoEError(f"data.shard_tokens={self.shard_tokens!r} must be a positive integer")
        if self.verify not in ("size", "full"):
            raise JetMoEError(f"data.verify={self.verify!r} is unknown; use size (check shard sizes at open) or full "
                              f"(also read every shard's checksum)")
        if self.name == "mixture":
            from jetmoe.data.mixture_config import parse_mixture

            parse_mixture(self.sources, self.phases)
        elif self.sources or self.phases:
            raise JetMoEError(f"data.sources / data.phases need data=mixture (data.name is {self.name!r})")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise JetMoEError(f"data.max_tokens={self.max_tokens} must be positive (or null for no limit)")
