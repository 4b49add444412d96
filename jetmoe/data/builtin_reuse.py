"""The builtin BPE of a mixture cache survives a corpus that grew.

`data.tokenizer=builtin` trains a BPE on the mixture's files, keyed by every file's (path, size, mtime),
so appending one document would train a new tokenizer and invalidate every shard of the cache. Instead
the cache tree records which files its builtin tokenizer was trained on (`trained_on` in the tree's
tokenizer.json, with the tokenizer's own file); when each of those files is still there and no smaller
(appended to) and the rest are new files, that tokenizer is reused and only the changed files are
re-tokenized. Any other change (a file shrank, was replaced by a smaller one, or is gone) is one line
naming the file and the ways forward.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from jetmoe.errors import JetMoEError


def inputs_record(units, vocab_size: int, tokenizer_file: Path, cache_root: Path) -> dict:
    """What the tree's tokenizer.json keeps about the builtin tokenizer's training corpus."""
    return {"trained_on": [{"path": u.path, "size": u.size_bytes} for u in units],
            "requested_vocab_size": vocab_size, "file": str(tokenizer_file.relative_to(cache_root))}


def corpus_changes(trained_on: list[dict], units) -> tuple[list[str], list[str]]:
    """(growth, breaking): lines naming files that grew or are new, and files that shrank or are gone."""
    now = {u.path: u.size_bytes for u in units}
    growth, breaking = [], []
    for entry in trained_on:
        path, size = entry["path"], int(entry["size"])
        if path not in now:
            breaking.append(f"{path} is no longer an input")
        elif now[path] < size:
            breaking.append(f"{path} shrank from {size:,} to {now[path]:,} bytes")
        elif now[path] > size:
            growth.append(f"{path} grew by {now[path] - size:,} bytes")
    known = {e["path"] for e in trained_on}
    growth += [f"{p} is new" for p in now if p not in known]
    return growth, breaking


def reusable_builtin(root: Path, cache_root: Path, units, vocab_size: int,
                     log: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The tokenizer file the tree `root` was made with, when the corpus only grew since; else None
    (no tree yet, or the same corpus). Raises when the corpus changed in any other way."""
    record_file = root / "tokenizer.json"
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    if "trained_on" not in record or record.get("requested_vocab_size") != vocab_size:
        return None  # a cache made before this record existed, or for another vocabulary: the usual checks
    tokenizer_file = cache_root / record["file"]
    growth, breaking = corpus_changes(record["trained_on"], units)
    if breaking:
        raise JetMoEError(
            f"the builtin tokenizer of the token cache {root} was trained on files that changed: {breaking[0]}"
            f"{f' (and {len(breaking) - 1} more)' if len(breaking) > 1 else ''}; restore the file, or keep that "
            f"tokenizer with data.tokenizer={tokenizer_file} (a new cache tree), or delete {root} to train a new one")
    if not tokenizer_file.is_file():
        raise JetMoEError(f"the token cache {root} was made with the builtin tokenizer {tokenizer_file}, which is "
                          f"gone; delete {root} to train a new one and re-tokenize")
    if growth and log:
        log(f"the corpus grew since the builtin tokenizer was trained ({growth[0]}"
            f"{f', and {len(growth) - 1} more' if len(growth) > 1 else ''}): reusing it, so only changed files are "
            f"tokenized again; to pin it elsewhere, data.tokenizer={tokenizer_file}")
    return tokenizer_file
