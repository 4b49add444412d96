"""Tokenizers: the built-in byte-level BPE (trained on the corpus, cached), or a user's (path or hub name).

Every tokenizer is wrapped in `TextTokenizer`, a `tokenizers.Tokenizer` plus its EOS id, so packing and
the cache key do not care where it came from.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Optional

from jetmoe.errors import JetMoEError

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class TextTokenizer:
    """Batch encoding without special tokens (packing adds EOS itself); picklable for `datasets.map`.

    `special`: transformers' special-token strings (bos_token, eos_token, and unk/pad when the tokenizer
    has them), for exports; a tokenizer without a BOS token uses its EOS (GPT-2's convention) there.
    `bos_token_id` is the tokenizer's own BOS (None without one): the model config is checked against it."""

    def __init__(self, backend, eos_token_id: int, name: str, bos_token_id: Optional[int] = None,
                 special: dict[str, str] | None = None):
        self.backend = backend  # tokenizers.Tokenizer
        self.eos_token_id = int(eos_token_id)
        self.name = name
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if bos_token_id is None:  # packing never adds BOS; known only to check the model config against
            bos_token_id = next((backend.token_to_id(t) for t in _BOS_CANDIDATES
                                 if backend.token_to_id(t) is not None), None)
        self.bos_token_id = bos_token_id
        self.special = dict(special or _special_from_vocab(backend, self.eos_token_id))
        self.special.setdefault("eos_token", backend.id_to_token(self.eos_token_id))
        self.special.setdefault("bos_token", self.special["eos_token"])

    def token_id(self, key: str) -> int | None:
        """The id of special token `key` ("bos_token", ...), or None."""
        token = self.special.get(key)
        return self.backend.token_to_id(token) if token is not None else None

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.backend.to_str().encode())
        h.update(str(self.eos_token_id).encode())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"


def train_bpe(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE with one special token (EOS); deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise JetMoEError(
            f"model vocab_size={vocab_size} is too small for the builtin byte-level tokenizer "
            f"(needs at least {len(alphabet) + 1}); raise model.vocab_size"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def builtin_tokenizer(path: Path, texts: Callable[[], Iterable[str]], vocab_size: int) -> TextTokenizer:
    """Load the cached builtin tokenizer at `path` (a tokenizer.json), or train and save it there."""
    from tokenizers import Tokenizer

    from jetmoe.data.cache import build_once

    def build(tmp_dir: Path) -> None:
        train_bpe(texts(), vocab_size).save(str(tmp_dir / "tokenizer.json"))

    build_once(path.parent, build)
    backend = Tokenizer.from_file(str(path))
    return TextTokenizer(backend, backend.token_to_id(EOS_TOKEN), "builtin")


def _special_from_vocab(backend, eos_token_id: int) -> dict[str, str]:
    special = {"eos_token": backend.id_to_token(eos_token_id)}
    bos = next((t for t in _BOS_CANDIDATES if backend.token_to_id(t) is not None), None)
    if bos is not None:
        special["bos_token"] = bos
    for key, token in (("unk_token", "<unk>"), ("pad_token", "<pad>")):
        if backend.token_to_id(token) is not None:
            special[key] = token
    return special


def _eos_from_vocab(backend, name: str) -> int:
    for token in _EOS_CANDIDATES:
        tid = backend.token_to_id(token)
        if tid is not None:
            return tid
    raise JetMoEError(f"tokenizer {name!r} has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)})")


def load_tokenizer(spec: str, resolve: Callable[[str], Path]) -> TextTokenizer:
    """`spec`: a tokenizer.json file, a directory holding one (or a transformers tokenizer), or a hub name."""
    from tokenizers import Tokenizer

    local = resolve(spec)
    if local.is_file():
        try:
            backend = Tokenizer.from_file(str(local))
        except Exception as e:
            raise JetMoEError(f"data.tokenizer={spec}: cannot read it as a tokenizers JSON file ({e})") from None
        return TextTokenizer(backend, _eos_from_vocab(backend, spec), spec)
    looks_local = local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_local and not local.is_dir():
        raise JetMoEError(f"data.tokenizer={spec}: no such file or directory ({local})")
    return _load_pretrained(str(local) if local.is_dir() else spec)


def _load_pretrained(name: str) -> TextTokenizer:
    """transformers' AutoTokenizer when installed (it knows every format), else tokenizers' hub loader."""
    hint = "give a local path, set HF_HUB_OFFLINE=0 with network, or use data.tokenizer=builtin"
    try:
        from transformers import AutoTokenizer
    except ImportError:
        AutoTokenizer = None
    if AutoTokenizer is not None:
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise JetMoEError(f"tokenizer {name!r} not found ({type(e).__name__}); {hint}") from None
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise JetMoEError(f"tokenizer {name!r} has no fast (Rust) version; convert it to tokenizer.json first")
        eos = tok.eos_token_id if tok.eos_token_id is not None else _eos_from_vocab(backend, name)
        special = {k: str(getattr(tok, k)) for k in SPECIAL_KEYS if getattr(tok, k, None) is not None}
        special["eos_token"] = backend.id_to_token(eos)
        wrapped = TextTokenizer(backend, eos, name, tok.bos_token_id, special)
        wrapped.vocab_size = max(wrapped.vocab_size, len(tok))
        return wrapped
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_pretrained(name)
    except Exception as e:
        raise JetMoEError(f"tokenizer {name!r} not found ({type(e).__name__}); {hint}") from None
    return TextTokenizer(backend, _eos_from_vocab(backend, name), name)


def builtin_path(cache_root: Path, corpus_key: Optional[str], vocab_size: int) -> Path:
    return cache_root / "tokenizers" / f"bpe-{corpus_key}-v{vocab_size}" / "tokenizer.json"


def make_tokenizer(spec: str, vocab_size: int, cache_root: Path, corpus_key: Optional[str],
                   corpus_texts: Optional[Callable[[], Iterable[str]]], resolve,
                   builtin_file: Optional[Path] = None) -> TextTokenizer:
    """`builtin_file`: where the builtin BPE is (or is to be trained), instead of the corpus key's place."""
    if spec == "builtin":
        if corpus_texts is None:
            raise JetMoEError("data.tokenizer=builtin needs a non-streaming source to train on; give a tokenizer path")
        tok = builtin_tokenizer(builtin_file or builtin_path(cache_root, corpus_key, vocab_size), corpus_texts,
                                vocab_size)
    else:
        tok = load_tokenizer(spec, resolve)
    if tok.vocab_size > vocab_size:
        raise JetMoEError(
            f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}; "
            f"set model.vocab_size>={tok.vocab_size} or use a smaller tokenizer"
        )
    return tok
