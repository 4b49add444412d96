"""Pre-tokenization survives what a node does to it: a worker killed mid-file, a huge document."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from helpers.data_corpus import synthetic_docs, tokenizer_file, write_jsonl
from helpers.data_mixture import VOCAB, mixture_cfg, write_corpus

from jetmoe.data.long_docs import encode_bounded, pieces
from jetmoe.data.mixture_build import pretokenize_mixture
from jetmoe.data.tokenizer import load_tokenizer
from jetmoe.errors import JetMoEError


def cache_bytes(cfg) -> dict:
    root = Path(cfg.cache_dir) / "mixture"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock" and not p.name.endswith("tokenizer.json")}


@pytest.mark.slow
def test_a_killed_worker_stops_the_run_with_one_line_and_a_rerun_resumes(tmp_path, tmp_path_factory, monkeypatch):
    import jetmoe.data.pretokenize as pt

    sources = write_corpus(tmp_path / "corpus")
    clean = mixture_cfg(tmp_path, tmp_path_factory, sources, cache_dir=str(tmp_path / "clean"))
    pretokenize_mixture(clean, VOCAB)
    cfg = mixture_cfg(tmp_path, tmp_path_factory, sources, cache_dir=str(tmp_path / "killed"), num_proc=2)
    real = pt.write_unit

    def oom_killed(unit, tokenizer, root, shard_tokens, progress=None, hf_cache=None):
        if unit.path.endswith("part1.jsonl"):
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does to a worker
        return real(unit, tokenizer, root, shard_tokens, progress, hf_cache)

    def hung(signum, frame):
        raise TimeoutError("pretokenize waited for a dead worker")

    monkeypatch.setattr(pt, "write_unit", oom_killed)  # the forked workers inherit it
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(90)
    try:
        with pytest.raises(JetMoEError) as err:
            pretokenize_mixture(cfg, VOCAB)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    message = str(err.value)
    assert "\n" not in message and "worker process died" in message and "part1.jsonl" in message, message
    assert "run the same command again to resume" in message
    monkeypatch.undo()
    pretokenize_mixture(cfg, VOCAB)  # the rerun finishes what is missing
    assert cache_bytes(cfg) == cache_bytes(clean)


def test_a_long_document_is_encoded_in_bounded_pieces_to_the_same_ids(tmp_path_factory):
    tok = load_tokenizer(str(tokenizer_file(tmp_path_factory)), Path)
    words = synthetic_docs(400, seed=3)
    long_doc = "  ".join(words[:200]) + "\n\n" + " ".join(words[200:])  # runs of whitespace too
    texts = ["short one", long_doc, "short two"]
    seen = []
    real_batch, real_one = tok.encode_batch, tok.encode
    tok.encode_batch = lambda ts: (seen.extend(ts), real_batch(ts))[1]
    tok.encode = lambda t: (seen.append(t), real_one(t))[1]
    out = encode_bounded(tok, texts, np.dtype(np.uint16), piece_chars=500)
    assert max(len(t) for t in seen) <= 500 and len(seen) > len(long_doc) // 500
    whole = [np.asarray(real_one(t), dtype=np.uint16) for t in texts]
    assert all(np.array_equal(a, b) for a, b in zip(out, whole))
    cut = pieces("x" * 1200, 500)  # no space to cut at: cut at the length, nothing lost
    assert [len(p) for p in cut] == [500, 500, 200] and "".join(cut) == "x" * 1200


def test_pre_tokenization_never_hands_the_tokenizer_a_whole_long_document(tmp_path, tmp_path_factory, monkeypatch):
    from jetmoe.data.tokenizer import TextTokenizer

    long_doc = " ".join(synthetic_docs(2000, seed=5))  # ~280K characters
    assert len(long_doc) > 1 << 18
    write_jsonl(tmp_path / "long.jsonl", ["a short one", long_doc, "another short one"])
    cfg = mixture_cfg(tmp_path, tmp_path_factory, {"s": {"path": str(tmp_path / "long.jsonl")}}, valid_fraction=0.0,
                      shard_tokens=1 << 20)
    seen = []
    real_batch, real_one = TextTokenizer.encode_batch, TextTokenizer.encode
    monkeypatch.setattr(TextTokenizer, "encode_batch", lambda self, ts: (seen.extend(ts), real_batch(self, ts))[1])
    monkeypatch.setattr(TextTokenizer, "encode", lambda self, t: (seen.append(t), real_one(self, t))[1])
    pretokenize_mixture(cfg, VOCAB)
    assert max(len(t) for t in seen) <= 1 << 18
    monkeypatch.undo()
    tok = load_tokenizer(cfg.tokenizer, Path)
    (shard,) = Path(cfg.cache_dir).rglob("000000.bin")
    expected = np.concatenate([np.append(np.asarray(tok.encode(t), dtype=np.uint16), tok.eos_token_id)
                               for t in ["a short one", long_doc, "another short one"]])
    assert np.array_equal(np.fromfile(shard, dtype=np.uint16), expected)  # one document, the same ids
