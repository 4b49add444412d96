"""The sharded token cache checks itself: sizes at open, crc32 and token ids on --verify, ids per batch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.data_corpus import tokenizer_file
from helpers.data_mixture import MAX_POS, VOCAB, mixture_cfg, mixture_overrides, write_corpus

from jetmoe.data import build_data
from jetmoe.data.mixture_build import pretokenize_mixture, verify_mixture
from jetmoe.data.shard_check import read_shard
from jetmoe.errors import JetMoEError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path, tmp_path_factory):
    cfg = mixture_cfg(tmp_path, tmp_path_factory, write_corpus(tmp_path / "corpus"))
    pretokenize_mixture(cfg, VOCAB)
    return cfg


def shards(cfg) -> list[Path]:
    return sorted(Path(cfg.cache_dir).rglob("0*.bin"))


def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_each_shard_record_matches_the_file_it_describes(cfg):
    for done_file in Path(cfg.cache_dir).rglob("done.json"):
        done = json.loads(done_file.read_text())
        for shard in done["shards"]:
            on_disk = read_shard(done_file.parent / f"{shard['name']}.bin", np.dtype(done["dtype"]))
            assert {k: shard[k] for k in on_disk} == on_disk
            sidecar = json.loads((done_file.parent / f"{shard['name']}.json").read_text())
            assert sidecar == {k: v for k, v in shard.items() if k != "name"}
    assert verify_mixture(cfg, VOCAB)["shards"] == len(shards(cfg))


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_shard_fails_at_open_naming_it(cfg, damage):
    victim = shards(cfg)[3]
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[:-10])
    else:
        victim.unlink()
    with pytest.raises(JetMoEError) as err:
        build_data(cfg, VOCAB, MAX_POS)
    assert str(victim) in one_line(err) and ("missing" if damage == "missing" else "truncated") in str(err.value)
    with pytest.raises(JetMoEError, match=str(victim)):  # no "cache complete" from a re-run either
        pretokenize_mixture(cfg, VOCAB)


def test_same_size_garbage_is_found_by_verify_and_by_a_full_open(cfg):
    victim = shards(cfg)[2]
    garbage = np.random.default_rng(0).integers(0, 200, victim.stat().st_size // 2, dtype=np.uint16)
    victim.write_bytes(garbage.tobytes())  # in-vocabulary, right size: only the checksum can tell
    build_data(cfg, VOCAB, MAX_POS)  # the default open checks sizes only
    with pytest.raises(JetMoEError) as err:
        verify_mixture(cfg, VOCAB)
    assert str(victim) in one_line(err) and "crc32" in str(err.value) and str(victim.parent) in str(err.value)
    cfg.verify = "full"
    with pytest.raises(JetMoEError, match="crc32"):
        build_data(cfg, VOCAB, MAX_POS)


def test_a_token_id_outside_the_vocabulary_names_the_shard(cfg):
    victim = shards(cfg)[0]
    tokens = np.fromfile(victim, dtype=np.uint16)
    tokens[5] = VOCAB + 7
    tokens.tofile(victim)  # same size: the open's size check passes
    data = build_data(cfg, VOCAB, MAX_POS)
    with pytest.raises(JetMoEError) as err:
        for view in data.train:  # every training window, as the steps would draw them
            view.windows(np.arange(len(view)))
    assert str(victim) in one_line(err) and f"token id {VOCAB + 7}" in str(err.value)
    with pytest.raises(JetMoEError, match=f"{victim}.*crc32"):
        verify_mixture(cfg, VOCAB)
    done = victim.parent / "done.json"  # a converter's record that admits the id is refused at open
    record = json.loads(done.read_text())
    record["shards"][0]["max_token_id"] = VOCAB + 7
    done.write_text(json.dumps(record))
    with pytest.raises(JetMoEError, match=f"{victim} .*token id {VOCAB + 7}, outside"):
        build_data(cfg, VOCAB, MAX_POS)


@pytest.mark.slow
def test_pretokenize_verify_exits_2_with_one_line_naming_the_shard(tmp_path, tmp_path_factory):
    overrides = mixture_overrides(tmp_path, tokenizer_file(tmp_path_factory))
    script = [sys.executable, str(REPO / "train" / "pretokenize.py")]
    made = subprocess.run([*script, *overrides], capture_output=True, text=True, timeout=180)
    assert made.returncode == 0, made.stderr[-2000:]
    clean = subprocess.run([*script, "--verify", *overrides], capture_output=True, text=True, timeout=180)
    assert clean.returncode == 0 and "cache verified" in clean.stdout, clean.stderr[-2000:]
    victim = sorted((tmp_path / "cache").rglob("0*.bin"))[1]
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    bad = subprocess.run([*script, "--verify", *overrides], capture_output=True, text=True, timeout=180)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and str(victim) in bad.stderr, bad.stderr
