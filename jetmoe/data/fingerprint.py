"""What data a run trains on, in a form a checkpoint can store and a resume can compare: the tokenizer and,
per source, its tokens and documents (and, for one source, its cache key, which changes with the text).
Mixture weights and phases are not part of it: switching phases is a schedule, not other data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def data_fingerprint(data) -> dict:
    """`data`: what build_data returned (Data or MixtureData)."""
    stats = data.stats
    tokens, docs = stats.get("num_tokens"), stats.get("num_documents")
    if isinstance(tokens, dict):  # data=mixture: per source
        sources = {name: {"tokens": int(tokens[name]), "documents": int(docs.get(name, 0))} for name in sorted(tokens)}
    else:
        sources = {"data": {"tokens": int(tokens), "documents": int(docs),
                            "cache_key": Path(stats["cache"]).name if stats.get("cache") else None}}
    fp = {"tokenizer": data.tokenizer.fingerprint(), "sources": sources}
    fp["id"] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    return fp


def describe_change(saved: dict, now: dict) -> str:
    """A short phrase naming what differs between two fingerprints."""
    parts = []
    if saved.get("tokenizer") != now.get("tokenizer"):
        parts.append("another tokenizer")
    before, after = saved.get("sources", {}), now.get("sources", {})
    if set(before) != set(after):
        parts.append(f"sources {sorted(before)} -> {sorted(after)}")
    for name in sorted(set(before) & set(after)):
        if before[name] != after[name]:
            b, a = before[name], after[name]
            what = f"{b.get('tokens')} -> {a.get('tokens')} tokens" if b.get("tokens") != a.get("tokens") \
                else "other text of the same size"
            parts.append(f"{name}: {what}")
    return "; ".join(parts) or "other data"
