"""A two-source corpus (web: three jsonl files, code: one .jsonl.zst in a subdirectory) for mixture tests."""

from __future__ import annotations

import json
from pathlib import Path

from helpers.data_corpus import synthetic_docs, tokenizer_file, write_jsonl

from jetmoe.data import DataConfig

VOCAB = 2048
MAX_POS = 512


def write_zst(path: Path, docs: list[str], field: str = "text") -> Path:
    import zstandard

    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({field: d}) + "\n" for d in docs)
    path.write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    return path


def write_corpus(root: Path, web_docs: int = 150, code_docs: int = 80) -> dict:
    (root / "web").mkdir(parents=True, exist_ok=True)
    for i in range(3):
        write_jsonl(root / "web" / f"part{i}.jsonl", synthetic_docs(web_docs, seed=i))
    write_zst(root / "code" / "sub" / "a.jsonl.zst", [f"def f{i}(): return {i}" for i in range(code_docs)])
    return {"web": {"path": str(root / "web" / "*.jsonl"), "weight": 0.7},
            "code": {"path": str(root / "code" / "**" / "*.jsonl.zst"), "weight": 0.3}}


def mixture_cfg(tmp_path: Path, tmp_path_factory, sources: dict, **kw) -> DataConfig:
    kw.setdefault("seq_len", 16)
    kw.setdefault("valid_fraction", 0.1)
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    kw.setdefault("tokenizer", str(tokenizer_file(tmp_path_factory)))
    kw.setdefault("shard_tokens", 1500)
    kw.setdefault("num_proc", 1)
    return DataConfig(name="mixture", sources=sources, **kw)


def mixture_overrides(root: Path, tokenizer: Path) -> list[str]:
    """Hydra overrides (train/pretokenize.py, train/pretrain.py) for write_corpus's two sources in two phases
    (steps 1-2: web 3 : code 1, then an even split), with a model whose vocabulary and EOS fit the tokenizer."""
    overrides = ["data=mixture", f"data.tokenizer={tokenizer}", f"data.cache_dir={root / 'cache'}",
                 "data.valid_fraction=0.1", "data.shard_tokens=2000", "data.num_proc=1", "model.vocab_size=512",
                 "model.eos_token_id=0"]
    for name, src in write_corpus(root / "corpus").items():
        overrides += [f"data.sources.{name}.path={src['path']}", f"data.sources.{name}.weight={src['weight']}"]
    return overrides + ["data.phases=[{start_step:0,weights:{web:3,code:1}},{start_step:2,weights:{web:1,code:1}}]"]
