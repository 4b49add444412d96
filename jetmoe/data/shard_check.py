"""Integrity of the sharded token cache: sizes at open, checksums and token ids on demand.

Each shard's record (its .json and its entry in done.json) holds `bytes`, `crc32` (zlib's, of the shard
file) and `max_token_id`, written when the shard closes. Three checks use them:

- `check_sizes` (every open, `data.verify=size`): one stat per shard, so a truncated, missing or
  replaced-by-another-size shard fails in seconds with one line naming the file, before step 1.
- `verify_shard` (`train/pretokenize.py --verify`, or every open with `data.verify=full`): reads the shard
  and compares its crc32 and largest token id with the record; garbage of the right size is found here.
- `check_window_ids` (every batch, on the CPU): a token id at or past the model's vocabulary is one line
  naming the shard, instead of an IndexError (a device-side assert on GPU) inside the embedding.

zlib.crc32 (stdlib, ~4 GB/s per core here) rather than a cryptographic hash: the threat is a torn or
overwritten file, not an adversary, and a verify pass is bound by the disk read either way.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from jetmoe.errors import JetMoEError

READ_CHUNK = 1 << 24  # bytes per read while verifying: memory stays bounded whatever the shard size


def shard_record(docs: Iterable[np.ndarray]) -> dict:
    """The integrity fields of a shard made of `docs` (the arrays written to it, in order)."""
    crc, nbytes, top = 0, 0, -1
    for doc in docs:
        crc = zlib.crc32(doc, crc)  # numpy arrays are buffers: no copy
        nbytes += doc.nbytes
        if doc.size:
            top = max(top, int(doc.max()))
    return {"bytes": nbytes, "crc32": crc, "max_token_id": top}


def _fix(unit_dir: Path) -> str:
    return f"delete {unit_dir} and run train/pretokenize.py again (it re-tokenizes only that file)"


def check_sizes(unit_dir: Path, done: dict, dtype: np.dtype, vocab_size: Optional[int] = None) -> None:
    """Every shard done.json lists exists with the size its record says; recorded token ids fit the vocabulary."""
    where = f"(input {done.get('input')})"
    for shard in done["shards"]:
        path = unit_dir / f"{shard['name']}.bin"
        expected = int(shard.get("bytes", int(shard["num_tokens"]) * dtype.itemsize))
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise JetMoEError(f"token shard {path} {where} is missing; {_fix(unit_dir)}") from None
        if size != expected:
            raise JetMoEError(f"token shard {path} {where} holds {size} bytes, its record says {expected} "
                              f"(truncated or overwritten); {_fix(unit_dir)}")
        top = shard.get("max_token_id")
        if vocab_size is not None and top is not None and top >= vocab_size:
            raise JetMoEError(f"token shard {path} {where} holds token id {top}, outside the model's vocabulary "
                              f"of {vocab_size}; {_fix(unit_dir)} with the model's tokenizer")


def read_shard(path: Path, dtype: np.dtype) -> dict:
    """crc32, size and largest token id of a shard file as it is on disk, read in bounded chunks."""
    crc, nbytes, top = 0, 0, -1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            nbytes += len(chunk)
            usable = len(chunk) - len(chunk) % dtype.itemsize
            if usable:
                top = max(top, int(np.frombuffer(chunk, dtype=dtype, count=usable // dtype.itemsize).max()))
    return {"bytes": nbytes, "crc32": crc, "max_token_id": top}


def verify_shard(unit_dir: Path, shard: dict, dtype: np.dtype, vocab_size: Optional[int], input_path) -> Optional[str]:
    """None if the shard matches its record (and the vocabulary), else what is wrong with it."""
    path = unit_dir / f"{shard['name']}.bin"
    if not path.is_file():
        return f"{path} (input {input_path}) is missing"
    found = read_shard(path, dtype)
    expected = int(shard.get("bytes", int(shard["num_tokens"]) * dtype.itemsize))
    if found["bytes"] != expected:
        return f"{path} (input {input_path}) holds {found['bytes']} bytes, its record says {expected}"
    if "crc32" in shard and found["crc32"] != int(shard["crc32"]):
        return f"{path} (input {input_path}) has crc32 {found['crc32']:08x}, its record says {int(shard['crc32']):08x}"
    if vocab_size is not None and found["max_token_id"] >= vocab_size:
        return (f"{path} (input {input_path}) holds token id {found['max_token_id']}, outside the model's "
                f"vocabulary of {vocab_size}")
    return None


def verify_units(units: list[tuple[Path, dict]], dtype: np.dtype, vocab_size: Optional[int],
                 num_threads: int = 1) -> int:
    """Check every shard of every (unit_dir, done) against its record; returns the bytes read.

    Threads, not processes: zlib.crc32, file reads and numpy's max release the GIL, so the pass runs at
    disk speed with no copies between processes. Every bad shard is collected, then one error names them.
    """
    jobs = [(d, s, done.get("input")) for d, done in units for s in done["shards"]]
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        found = pool.map(lambda j: (j[0], verify_shard(j[0], j[1], dtype, vocab_size, j[2])), jobs)
        problems = [(d, p) for d, p in found if p]
    if problems:
        dirs = sorted({str(d) for d, _ in problems})
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise JetMoEError(f"{len(problems)} of {len(jobs)} token shards fail verification: {problems[0][1]}{more}; "
                          f"delete {', '.join(dirs[:3])}{' ...' if len(dirs) > 3 else ''} and run "
                          f"train/pretokenize.py again (it re-tokenizes only those files)")
    return sum(int(s.get("bytes", 0)) for _, done in units for s in done["shards"])


def check_window_ids(out: np.ndarray, shards: np.ndarray, paths: list[Path], vocab_size: Optional[int]) -> None:
    """`out[row]` came from shard `shards[row]`: a token id >= vocab_size there is one line naming the shard."""
    if vocab_size is None or not out.size:
        return
    top = out.max(axis=1)
    bad = np.flatnonzero(top >= vocab_size)
    if bad.size:
        row = int(bad[0])
        raise JetMoEError(f"token shard {paths[int(shards[row])]} holds token id {int(top[row])}, outside the "
                          f"model's vocabulary of {vocab_size}; run train/pretokenize.py --verify with the same "
                          f"overrides to find every damaged shard")
