"""The sharded token cache of `data=mixture`: one directory per input file, whole documents per shard.

Layout (an interface: converters may write it):

    <cache_dir>/mixture/<tokenizer-slug>-<8 hex>/   one tree per tokenizer (slug and hash of data.tokenizer)
        tokenizer.json      {name, fingerprint, eos_token_id, bos_token_id, vocab_size, dtype
                             [, trained_on, requested_vocab_size, file: the builtin BPE's, builtin_reuse.py]}
        <unit id>/          one input file (or hub split); id = hash(path, size, mtime, text_field, txt_sample_by)
            000000.bin      tokens (dtype above), documents each followed by EOS, no header
            000000.json     {num_tokens, num_documents, bytes, crc32, max_token_id}: written after 000000.bin
                            is renamed into place (shard_check.py reads the last three)
            ...             a shard closes at the first document end at or past data.shard_tokens tokens
            done.json       {input, tokenizer_fingerprint, dtype, eos_token_id, num_tokens, num_documents,
                             shards: [{name, num_tokens, num_documents, bytes, crc32, max_token_id}]}: the unit
                             is complete

A reader trusts only units with done.json, and only the shards it lists; anything else (a `.tmp-*` file,
a shard without its .json) is a writer's leftover. A killed writer restarts its unit after the last
shard with a .json, skipping the documents those shards hold, so the result is the same bytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from jetmoe.data.long_docs import encode_bounded
from jetmoe.data.mixture_config import SourceSpec
from jetmoe.data.shard_check import shard_record
from jetmoe.data.sources import COMPRESSIONS, file_format
from jetmoe.errors import JetMoEError

DONE = "done.json"
ENCODE_BATCH = 1000


@dataclass(frozen=True)
class Unit:
    """One input file (or one hub split): the unit of work, of resumption and of completeness."""
    source: str
    spec: SourceSpec
    path: str  # resolved file path, or the hub dataset name / local dataset directory
    fmt: Optional[str]  # datasets builder; None for a hub dataset
    size_bytes: int
    uid: str


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def plan_units(spec: SourceSpec) -> list[Unit]:
    """The input units of one source (stat only, nothing read); a bad path names the source."""
    from jetmoe.paths import resolve_user_path
    from jetmoe.data.sources import expand_files

    paths = spec.path if isinstance(spec.path, (list, tuple)) else [spec.path]
    first = str(paths[0])
    if len(paths) == 1 and not any(c in first for c in "*?[") and not resolve_user_path(first).exists():
        if not _hub_name(first):  # a file that is not there: say so before any network lookup
            raise JetMoEError(f"data.sources.{spec.name}.path={first}: no such file or directory "
                              f"{resolve_user_path(first)} (relative paths start from the launch directory; "
                              f"a hub dataset is named owner/name)")
        name = first
        uid = _digest("hub-v1", name, spec.hub_config, spec.split, spec.text_field)
        return [Unit(spec.name, spec, name, None, 0, uid)]
    try:
        files = expand_files(spec.path)
    except JetMoEError as e:
        raise JetMoEError(f"data.sources.{spec.name}: {e}") from None
    units = []
    for f in files:
        st = f.stat()
        uid = _digest("file-v1", str(f.resolve()), st.st_size, st.st_mtime_ns, spec.text_field, spec.txt_sample_by)
        units.append(Unit(spec.name, spec, str(f), file_format(f), st.st_size, uid))
    return units


def _hub_name(path: str) -> bool:
    """owner/name, without a data file's extension: what a hub dataset id looks like (files exist or fail here)."""
    return (path.count("/") == 1 and not path.startswith((".", "/", "~"))
            and file_format(Path(path)) is None and not path.endswith(COMPRESSIONS))


def tokenizer_root(cache_root: Path, tokenizer_name: str) -> Path:
    p = Path(tokenizer_name)
    readable = p.parent.name if p.suffix == ".json" and p.parent.name else (p.name or tokenizer_name)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", readable).strip("-.")[:40] or "tok"
    return cache_root / "mixture" / f"{slug}-{hashlib.sha256(tokenizer_name.encode()).hexdigest()[:8]}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def check_tokenizer_record(root: Path, tokenizer, create: bool, extra: Optional[dict] = None) -> None:
    """The tree's tokenizer.json must describe `tokenizer`; a pre-tokenizer writes it the first time (with
    `extra`: the builtin tokenizer's training files, see builtin_reuse.py)."""
    record = {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint(), "eos_token_id": tokenizer.eos_token_id,
              "bos_token_id": getattr(tokenizer, "bos_token_id", None), "vocab_size": tokenizer.vocab_size,
              "dtype": token_dtype(tokenizer.vocab_size).name, **(extra or {})}
    path = root / "tokenizer.json"
    if path.is_file():
        found = json.loads(path.read_text())
        if found.get("fingerprint") != record["fingerprint"]:
            raise JetMoEError(
                f"the token cache {root} was made with a different tokenizer (fingerprint {found.get('fingerprint')}, "
                f"data.tokenizer={tokenizer.name} has {record['fingerprint']}); delete it or set another data.cache_dir"
                + ("; the builtin tokenizer is trained on the data, and this cache predates the record that lets it be "
                   "reused when the data grows: pin the old one with data.tokenizer=<its tokenizer.json under "
                   f"{root.parent.parent / 'tokenizers'}>" if tokenizer.name == "builtin" else ""))
    elif create:
        root.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(path, record)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_done(unit_dir: Path) -> Optional[dict]:
    path = unit_dir / DONE
    return json.loads(path.read_text()) if path.is_file() else None


# ---- reading the text of one unit ------------------------------------------------------------------

def iter_texts(unit: Unit, hf_cache: Optional[Path] = None) -> Iterator[list[str]]:
    """Batches of the unit's non-blank documents, streamed (no Arrow copy of the file on disk)."""
    import datasets

    from jetmoe.data.sources import _first_line, _raise_json_error

    spec, where = unit.spec, f"data.sources.{unit.source}: {unit.path}"
    try:
        if unit.fmt is None:
            ds = datasets.load_dataset(unit.path, spec.hub_config, split=spec.split, streaming=True,
                                       cache_dir=str(hf_cache) if hf_cache else None)
        else:
            kwargs = {"sample_by": spec.txt_sample_by} if unit.fmt == "text" else {}
            ds = datasets.load_dataset(unit.fmt, data_files=[unit.path], split="train", streaming=True,
                                       cache_dir=str(hf_cache) if hf_cache else None, **kwargs)
        field = "text" if unit.fmt == "text" else spec.text_field
        rows = 0
        for batch in ds.iter(batch_size=ENCODE_BATCH):
            if field not in batch:
                raise JetMoEError(f"{where} has no field {field!r}; fields: {', '.join(batch)} "
                                  f"(set data.sources.{unit.source}.text_field)")
            for i, t in enumerate(batch[field]):
                if t is not None and not isinstance(t, str):
                    raise JetMoEError(f"{where}: row {rows + i + 1}: {field!r} holds {type(t).__name__} "
                                      f"{repr(t)[:40]}, not text; fix that row or set "
                                      f"data.sources.{unit.source}.text_field to a text column")
            rows += len(batch[field])
            texts = [t for t in batch[field] if t and not t.isspace()]
            if texts:
                yield texts
    except JetMoEError:
        raise
    except Exception as e:
        if unit.fmt == "json" and not unit.path.endswith(COMPRESSIONS):
            try:
                _raise_json_error([Path(unit.path)])
            except JetMoEError as bad:
                raise JetMoEError(f"data.sources.{unit.source}: {bad}") from None
        raise JetMoEError(f"{where}: cannot read it ({_first_line(e)})") from None


# ---- writing one unit ------------------------------------------------------------------------------

def _finished_shards(unit_dir: Path) -> list[dict]:
    shards, k = [], 0
    while (unit_dir / f"{k:06d}.json").is_file() and (unit_dir / f"{k:06d}.bin").is_file():
        shards.append({"name": f"{k:06d}", **json.loads((unit_dir / f"{k:06d}.json").read_text())})
        k += 1
    return shards


def write_unit(unit: Unit, tokenizer, root: Path, shard_tokens: int,
               progress: Optional[Callable[[int, int], None]] = None, hf_cache: Optional[Path] = None) -> dict:
    """Tokenize one unit into root/<uid>/ (resuming after its last finished shard); returns done.json's dict.

    `progress(tokens, documents)` is called after each encoded batch. A unit another process holds (its
    lock is taken) is skipped: returns None.
    """
    unit_dir = root / unit.uid
    done = read_done(unit_dir)
    if done is not None:
        return done
    unit_dir.mkdir(parents=True, exist_ok=True)
    with open(unit_dir / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        done = read_done(unit_dir)
        if done is not None:
            return done
        for stale in unit_dir.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)
        return _write_unit_locked(unit, tokenizer, unit_dir, shard_tokens, progress, hf_cache)


def _write_unit_locked(unit, tokenizer, unit_dir, shard_tokens, progress, hf_cache) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_token_id], dtype=dtype)
    shards = _finished_shards(unit_dir)
    skip = sum(s["num_documents"] for s in shards)
    pending: list[np.ndarray] = []
    pending_tokens = 0

    def flush() -> None:
        nonlocal pending, pending_tokens
        name = f"{len(shards):06d}"
        tmp = unit_dir / f".{name}.bin.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            for doc in pending:
                f.write(doc.tobytes())
        os.replace(tmp, unit_dir / f"{name}.bin")
        meta = {"num_tokens": pending_tokens, "num_documents": len(pending), **shard_record(pending)}
        _write_json_atomic(unit_dir / f"{name}.json", meta)
        shards.append({"name": name, **meta})
        pending, pending_tokens = [], 0

    for texts in iter_texts(unit, hf_cache):
        if skip >= len(texts):
            skip -= len(texts)
            continue
        texts, skip = texts[skip:], 0
        docs = [np.concatenate([ids, eos]) for ids in encode_bounded(tokenizer, texts, dtype)]
        for doc in docs:
            pending.append(doc)
            pending_tokens += len(doc)
            if pending_tokens >= shard_tokens:
                flush()
        if progress:
            progress(sum(len(d) for d in docs), len(docs))
    if pending:
        flush()
    done = {"input": unit.path, "source": unit.source, "tokenizer": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint(), "dtype": dtype.name,
            "eos_token_id": tokenizer.eos_token_id, "shard_tokens": shard_tokens,
            "num_tokens": sum(s["num_tokens"] for s in shards),
            "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    _write_json_atomic(unit_dir / DONE, done)
    return done
