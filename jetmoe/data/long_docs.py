"""Encode documents with bounded memory: a long document is tokenized in pieces, not in one call.

A `tokenizers` encoding keeps ~250 bytes per token (ids, offsets, token strings, masks) until the call
returns, so one 9 MB document took 1.7 GB in a pre-tokenization worker. Documents longer than
PIECE_CHARS are cut just before a space that follows a non-space character (where byte-level BPE
pre-tokenizers split anyway, so GPT-2-style tokenizers give the same ids as one call) and encoded piece
by piece into one array: the memory of one piece, ~0.1 GB at most. A document with no such space in a
piece (a minified blob) is cut at the piece length; tokenizers that prepend a marker to every input
(some SentencePiece conversions) may differ from one call at the seams. Either way it stays one document.
"""

from __future__ import annotations

import numpy as np

PIECE_CHARS = 1 << 18  # 256K characters: ~64K tokens, ~20 MB inside the tokenizer


def pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[str]:
    """`text` cut into consecutive pieces of at most `piece_chars` characters, preferring word starts."""
    out, start = [], 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        cut = text.rfind(" ", start + 1, end + 1)
        while cut > start and text[cut - 1].isspace():  # not inside a run of whitespace
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encode_bounded(tokenizer, texts: list[str], dtype: np.dtype, piece_chars: int = PIECE_CHARS) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), as `dtype` arrays; short texts are encoded in one batch."""
    short = [i for i, t in enumerate(texts) if len(t) <= piece_chars]
    out: list = [None] * len(texts)
    for i, ids in zip(short, tokenizer.encode_batch([texts[i] for i in short])):
        out[i] = np.asarray(ids, dtype=dtype)
    for i, text in enumerate(texts):
        if out[i] is None:
            out[i] = np.concatenate([np.asarray(tokenizer.encode(p), dtype=dtype) for p in pieces(text, piece_chars)])
    return out
