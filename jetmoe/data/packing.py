"""Tokenize a source into one flat token file (documents joined by EOS) and cut it into windows.

The token file does not depend on seq_len: window i of length seq_len + 1 starts at token i * seq_len
(consecutive windows share one token, so inputs/labels shifted by one cover every token, no padding).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from jetmoe.data.tokenizer import TextTokenizer
from jetmoe.errors import JetMoEError

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
_AUTO_PARALLEL_BYTES = 64 << 20  # below this, extra processes cost more than they save


def _encode(batch, tokenizer: TextTokenizer):
    texts = [t if t and not t.isspace() else "" for t in batch["text"]]  # blank documents are dropped
    return {"input_ids": tokenizer.encode_batch(texts)}


def auto_num_proc(num_proc: Optional[int], size_bytes: Optional[int]) -> Optional[int]:
    if num_proc is not None:
        return num_proc if num_proc > 1 else None
    if size_bytes is not None and size_bytes < _AUTO_PARALLEL_BYTES:
        return None
    return min(os.cpu_count() or 1, 8)


def _token_batches(ds, tokenizer: TextTokenizer, num_proc: Optional[int]):
    if isinstance(ds, list):  # texts in memory (the built-in corpus): batches as `datasets` would cut them
        for start in range(0, len(ds), 1000):
            yield _encode({"text": ds[start:start + 1000]}, tokenizer)["input_ids"]
        return
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        for batch in ds.iter(batch_size=1000):
            yield _encode(batch, tokenizer)["input_ids"]
        return
    if num_proc is not None:
        num_proc = min(num_proc, max(1, len(ds) // 1000))
    mapped = ds.map(_encode, batched=True, batch_size=1000, num_proc=num_proc if num_proc and num_proc > 1 else None,
                    remove_columns=ds.column_names, fn_kwargs={"tokenizer": tokenizer}, desc="tokenizing")
    for batch in mapped.iter(batch_size=1000):
        yield batch["input_ids"]


def write_token_cache(ds, tokenizer: TextTokenizer, out_dir: Path, description: str, num_proc: Optional[int],
                      max_tokens: Optional[int]) -> dict:
    """Tokenize `ds` ("text" column) into out_dir/tokens.bin + meta.json; returns the meta dict."""
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    start = time.perf_counter()
    num_tokens = num_docs = skipped = 0
    with open(out_dir / TOKENS_FILE, "wb") as f:
        for docs in _token_batches(ds, tokenizer, num_proc):
            chunk = [np.concatenate([np.asarray(d, dtype=dtype), eos]) for d in docs if len(d)]
            skipped += len(docs) - len(chunk)
            if not chunk:
                continue
            flat = np.concatenate(chunk)
            if max_tokens is not None and num_tokens + len(flat) > max_tokens:
                flat = flat[: max_tokens - num_tokens]
            f.write(flat.tobytes())
            num_tokens += len(flat)
            num_docs += len(chunk)
            if max_tokens is not None and num_tokens >= max_tokens:
                break
    if num_docs == 0:
        raise JetMoEError(f"empty dataset: {description} holds no text; check data.path / data.text_field")
    seconds = time.perf_counter() - start
    meta = {
        "num_tokens": num_tokens,
        "num_documents": num_docs,
        "skipped_documents": skipped,  # null, empty or blank text
        "dtype": np.dtype(dtype).name,
        "eos_token_id": tokenizer.eos_token_id,
        "tokenizer": tokenizer.name,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "source": description,
        "seconds": round(seconds, 3),
        "tokens_per_sec": round(num_tokens / max(seconds, 1e-9)),
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def open_token_cache(cache: Path) -> tuple[np.ndarray, dict]:
    """The cache's tokens (memory-mapped) and meta.json, checked against each other first: a truncated or
    altered tokens.bin would otherwise fail inside numpy ("mmap length is greater than file size")."""
    fix = f"delete {cache} and run again to rebuild it"
    try:
        meta = json.loads((cache / META_FILE).read_text())
        expected = int(meta["num_tokens"]) * np.dtype(meta["dtype"]).itemsize
        size = (cache / TOKENS_FILE).stat().st_size
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JetMoEError(f"token cache {cache} is damaged ({type(e).__name__}: {e}); {fix}") from None
    if size != expected:
        raise JetMoEError(f"token cache {cache} is damaged ({TOKENS_FILE} has {size} bytes, {META_FILE} says "
                          f"{expected}); {fix}")
    tokens = np.memmap(cache / TOKENS_FILE, dtype=np.dtype(meta["dtype"]), mode="r", shape=(meta["num_tokens"],))
    return tokens, meta


class PackedDataset:
    """`len(self)` windows of seq_len + 1 tokens; `self[i]` and `self.windows(ids)` return int64 arrays.

    `index` maps the dataset's own sample ids to window numbers in the token stream (train and validation
    interleave there), so both views share one token file.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, length: int, index: Callable[[np.ndarray], np.ndarray],
                 eos_token_id: int):
        self.tokens = tokens
        self.seq_len = seq_len
        self.length = length
        self.index = index
        self.eos_token_id = eos_token_id
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self.length

    def windows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.length):
            raise IndexError(f"sample id out of range [0, {self.length})")
        starts = self.index(ids) * self.seq_len
        return self.tokens[starts[:, None] + self._offsets].astype(np.int64)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.windows([i])[0]


def split_windows(tokens: np.ndarray, seq_len: int, valid_fraction: float, eos_token_id: int):
    """Every k-th window (k = round(1/valid_fraction)) goes to validation, the rest to training."""
    total = (len(tokens) - 1) // seq_len
    if total < 1:
        raise JetMoEError(
            f"the data holds {len(tokens)} tokens, fewer than data.seq_len+1={seq_len + 1}; "
            f"lower data.seq_len or add data"
        )
    if valid_fraction <= 0:
        return PackedDataset(tokens, seq_len, total, lambda j: j, eos_token_id), None
    k = max(2, round(1 / valid_fraction))
    n_valid = total // k
    train = PackedDataset(tokens, seq_len, total - n_valid, lambda j: (j // (k - 1)) * k + j % (k - 1), eos_token_id)
    valid = PackedDataset(tokens, seq_len, n_valid, lambda j: j * k + (k - 1), eos_token_id) if n_valid else None
    return train, valid
