"""Shared, built-once data for the data tests: the builtin corpus and its tokenizer, in one temp cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jetmoe.data import DataConfig, build_data
from jetmoe.data.packing import PackedDataset

TINY_VOCAB = 2048
MAX_POS = 512
_built: dict = {}


def builtin_data(tmp_path_factory):
    """build_data(data=builtin) once per session; returns (Data, cache_dir)."""
    if "builtin" not in _built:
        cache = tmp_path_factory.mktemp("jetmoe_cache")
        data = build_data(DataConfig(cache_dir=str(cache)), TINY_VOCAB, MAX_POS, seed=0)
        _built["builtin"] = (data, cache)
    return _built["builtin"]


SMALL_VOCAB = 400


def tokenizer_file(tmp_path_factory) -> Path:
    """A small byte-level BPE (SMALL_VOCAB tokens) saved as tokenizer.json, trained once per session."""
    if "tokenizer" not in _built:
        from jetmoe.data.tokenizer import train_bpe

        path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
        train_bpe(synthetic_docs(300, seed=9), SMALL_VOCAB).save(str(path))
        _built["tokenizer"] = path
    return _built["tokenizer"]


def synthetic_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "expert", "router", "token", "layer", "attention", "mixture", "of", "gate", "loss", "data"]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(5, 40)))) for i in range(n)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def packed(num_windows: int, seq_len: int = 8, eos: int = 0, seed: int = 0) -> PackedDataset:
    """A PackedDataset over random tokens, for sampler/loader tests that need no tokenizer."""
    tokens = np.random.default_rng(seed).integers(0, 50, size=num_windows * seq_len + 1).astype(np.uint16)
    return PackedDataset(tokens, seq_len, num_windows, lambda j: j, eos)
