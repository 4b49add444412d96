"""`build_data`: config -> tokenizer + token cache (built once) -> train/valid packed datasets + loaders."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from jetmoe.data.cache import build_once
from jetmoe.data.config import DataConfig
from jetmoe.paths import resolve_cache_dir, resolve_user_path
from jetmoe.data.loader import EvalLoader, RankLoader
from jetmoe.data.packing import PackedDataset, auto_num_proc, open_token_cache, split_windows, write_token_cache
from jetmoe.data.sources import Source, make_source
from jetmoe.data.tokenizer import TextTokenizer, make_tokenizer


@dataclass
class Data:
    cfg: DataConfig
    tokenizer: TextTokenizer
    train: PackedDataset
    valid: Optional[PackedDataset]
    seed: int
    stats: dict = field(default_factory=dict)

    def train_loader(self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, max_steps: Optional[int] = None) -> RankLoader:  # max_steps: for mixtures
        return RankLoader(self.train, global_batch_size, micro_batch_size, dp_rank, dp_size, self.seed,
                          self.cfg.document_mask)

    def eval_loader(self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    max_steps: Optional[int] = None) -> Optional[EvalLoader]:
        if self.valid is None:
            return None
        return EvalLoader(self.valid, global_batch_size, micro_batch_size, dp_rank, dp_size, max_steps,
                          self.cfg.document_mask)

    def eval_loaders_by_source(self, *args, **kwargs) -> dict:
        """One source: no per-source evaluation beside eval_loader (data=mixture has one per source)."""
        return {}


def _quiet_datasets():
    try:
        import datasets
    except ImportError:  # the built-in corpus needs no `datasets`; files and hub sources import it themselves
        return

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # failures reach the user as JetMoEError


def prepare_tokens(cfg: DataConfig, vocab_size: int, log: Optional[Callable[[str], None]] = None):
    """Tokenizer and token cache directory for `cfg`, building whatever is missing (once across processes)."""
    cache_root = resolve_cache_dir(cfg.cache_dir)
    source: Source = make_source(cfg, cache_root / "hf")
    _quiet_datasets()
    tokenizer = make_tokenizer(cfg.tokenizer, vocab_size, cache_root, source.key, source.texts, resolve_user_path)
    key = hashlib.sha256(json.dumps(["tokens-v1", source.key, tokenizer.fingerprint(), cfg.max_tokens]).encode())
    cache = cache_root / "tokens" / key.hexdigest()[:16]

    def build(tmp: Path) -> None:
        if log:
            log(f"tokenizing {source.description} with {tokenizer.name} into {cache}")
        meta = write_token_cache(source.load(), tokenizer, tmp, source.description,
                                 auto_num_proc(cfg.num_proc, source.size_bytes), cfg.max_tokens)
        if log:
            skipped = f" ({meta['skipped_documents']} null or empty skipped)" if meta.get("skipped_documents") else ""
            log(f"tokenized {meta['num_documents']} documents{skipped}, {meta['num_tokens']} tokens "
                f"in {meta['seconds']:.1f}s ({meta['tokens_per_sec']:,} tokens/s)")

    # tokens take about half the bytes of their text (uint16 ids, ~4 characters per token)
    built = build_once(cache, build, log, needed_bytes=source.size_bytes // 2 if source.size_bytes else None)
    return tokenizer, cache, built


def build_data(cfg, vocab_size: int, max_position_embeddings: int, seed: int = 0, *,
               log: Optional[Callable[[str], None]] = None, special_tokens: Optional[tuple] = None):
    """Every rank calls this; the first process on a cache builds it, the others wait and read it.

    `log` receives progress lines (pass `print` on rank 0 only). `special_tokens`: the model config's
    (bos_token_id, eos_token_id), checked against a user's tokenizer with data=mixture. data=mixture
    returns a `MixtureData` (same loader methods, plus per-source ones) and never tokenizes here: its
    sharded cache is filled by train/pretokenize.py.
    """
    cfg = DataConfig.from_any(cfg)
    cfg.validate(max_position_embeddings)
    if cfg.name == "mixture":
        from jetmoe.data.mixture_build import build_mixture_data

        _quiet_datasets()
        return build_mixture_data(cfg, vocab_size, seed, log=log, special_tokens=special_tokens)
    tokenizer, cache, built = prepare_tokens(cfg, vocab_size, log)
    tokens, meta = open_token_cache(cache)
    train, valid = split_windows(tokens, cfg.seq_len, cfg.valid_fraction, meta["eos_token_id"])
    stats = {
        "num_tokens": meta["num_tokens"],
        "num_documents": meta["num_documents"],
        "train_samples": len(train),
        "valid_samples": len(valid) if valid is not None else 0,
        "cache": str(cache),
        "built": built,
    }
    return Data(cfg, tokenizer, train, valid, seed, stats)
