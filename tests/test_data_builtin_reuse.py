"""A mixture's builtin tokenizer is kept when the corpus only grew; other changes name the file."""

import json
from pathlib import Path

import pytest
from helpers.data_mixture import MAX_POS, VOCAB, mixture_cfg, write_corpus

from jetmoe.data import build_data
from jetmoe.data.mixture_build import pretokenize_mixture
from jetmoe.errors import JetMoEError


@pytest.fixture
def grown(tmp_path, tmp_path_factory):
    """A builtin-tokenizer mixture pre-tokenized once: (cfg, its first stats, the record, shard bytes)."""
    sources = write_corpus(tmp_path / "corpus", web_docs=60, code_docs=40)
    cfg = mixture_cfg(tmp_path, tmp_path_factory, sources, tokenizer="builtin")
    first = pretokenize_mixture(cfg, VOCAB)["stats"]
    record = next(Path(cfg.cache_dir).rglob("mixture/builtin-*/tokenizer.json"))
    shards = {p: p.read_bytes() for p in Path(cfg.cache_dir).rglob("*.bin")}
    return cfg, first, record, shards, tmp_path / "corpus" / "web"


def test_appending_a_document_reuses_the_tokenizer_and_retokenizes_only_that_file(grown):
    cfg, first, record, shards, web = grown
    fingerprint = json.loads(record.read_text())["fingerprint"]
    with open(web / "part1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document, appended after the cache was made"}) + "\n")
    lines = []
    second = pretokenize_mixture(cfg, VOCAB, log=lines.append)["stats"]
    assert any("part1.jsonl grew by" in line and "reusing it" in line for line in lines)
    assert json.loads(record.read_text())["fingerprint"] == fingerprint
    assert second["num_documents"]["web"] == first["num_documents"]["web"] + 1
    assert second["num_documents"]["code"] == first["num_documents"]["code"]
    kept = [p for p, data in shards.items() if p.is_file() and p.read_bytes() == data]
    assert len(kept) == len(shards)  # nothing rewritten; part1's new shards are in a new unit directory
    assert build_data(cfg, VOCAB, MAX_POS).tokenizer.fingerprint() == fingerprint


def test_a_shrunk_file_is_named_and_the_pinned_tokenizer_it_suggests_works(grown):
    cfg, first, record, shards, web = grown
    lines = (web / "part2.jsonl").read_text().splitlines()
    (web / "part2.jsonl").write_text("\n".join(lines[:10]) + "\n")
    with pytest.raises(JetMoEError) as err:
        pretokenize_mixture(cfg, VOCAB)
    message = str(err.value)
    assert "\n" not in message and f"{web / 'part2.jsonl'} shrank from" in message
    pinned = message.split("data.tokenizer=")[1].split(" ")[0]
    cfg.tokenizer = pinned
    again = pretokenize_mixture(cfg, VOCAB)["stats"]
    assert again["num_documents"]["web"] == first["num_documents"]["web"] - (len(lines) - 10)
    assert build_data(cfg, VOCAB, MAX_POS).tokenizer.fingerprint() == json.loads(record.read_text())["fingerprint"]
