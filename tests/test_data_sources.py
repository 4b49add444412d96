"""Data sources (txt, jsonl, json, parquet, streaming, local dataset dir), bad inputs, build-once locking."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers.data_corpus import MAX_POS, SMALL_VOCAB, TINY_VOCAB, synthetic_docs, tokenizer_file, write_jsonl

from jetmoe.data import DataConfig, build_data, prepare_tokens
from jetmoe.errors import JetMoEError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files_cfg(tmp_path, tmp_path_factory):
    tok = str(tokenizer_file(tmp_path_factory))

    def make(path, **kw):
        kw.setdefault("seq_len", 16)
        kw.setdefault("valid_fraction", 0.0)
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        kw.setdefault("tokenizer", tok)
        kw.setdefault("name", "files")
        return DataConfig(path=path, **kw)

    return make


def stream_text(data) -> list[str]:
    """The documents of a built dataset, recovered from its token stream (split at EOS)."""
    tokens = np.asarray(data.train.tokens)
    eos = data.tokenizer.eos_token_id
    cuts = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [data.tokenizer.decode(tokens[a:b]) for a, b in zip(starts, cuts)]


# ---- formats -------------------------------------------------------------------------------------------

def test_jsonl_json_and_parquet_give_the_same_documents(tmp_path, files_cfg):
    docs = synthetic_docs(50)
    write_jsonl(tmp_path / "a.jsonl", docs, field="body")
    (tmp_path / "b.json").write_text(json.dumps([{"body": d} for d in docs]))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs, "n": list(range(50))}), tmp_path / "c.parquet")
    for name in ("a.jsonl", "b.json", "c.parquet"):
        data = build_data(files_cfg(str(tmp_path / name), text_field="body"), TINY_VOCAB, MAX_POS)
        assert stream_text(data) == docs, name
        assert data.stats["num_documents"] == 50


def test_txt_one_document_per_file_or_per_blank_line_block(tmp_path, files_cfg):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "1.txt").write_text("first para\nstill first\n\nsecond para\n")
    (tmp_path / "t" / "2.txt").write_text("another file\n")
    per_file = build_data(files_cfg(str(tmp_path / "t" / "*.txt"), seq_len=4), TINY_VOCAB, MAX_POS)
    assert [d.strip() for d in stream_text(per_file)] == ["first para\nstill first\n\nsecond para", "another file"]
    per_block = build_data(files_cfg(str(tmp_path / "t"), seq_len=4, txt_sample_by="paragraph"), TINY_VOCAB, MAX_POS)
    assert [d.strip() for d in stream_text(per_block)] == ["first para\nstill first", "second para", "another file"]


def test_a_list_of_paths_mixing_formats(tmp_path, files_cfg):
    write_jsonl(tmp_path / "a.jsonl", ["json doc one", "json doc two"])
    (tmp_path / "b.txt").write_text("text doc")
    data = build_data(files_cfg([str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")], seq_len=4), TINY_VOCAB, MAX_POS)
    assert sorted(d.strip() for d in stream_text(data)) == ["json doc one", "json doc two", "text doc"]


def test_streaming_files_and_local_dataset_dir_match_the_map_style_tokens(tmp_path, files_cfg):
    docs = synthetic_docs(300, seed=1)
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", docs)
    path = str(tmp_path / "ds" / "train.jsonl")
    plain = build_data(files_cfg(path), TINY_VOCAB, MAX_POS)
    streamed = build_data(files_cfg(path, streaming=True, cache_dir=str(tmp_path / "c2")), TINY_VOCAB, MAX_POS)
    np.testing.assert_array_equal(np.asarray(streamed.train.tokens), np.asarray(plain.train.tokens))
    hub_cfg = files_cfg(str(tmp_path / "ds"), streaming=True, cache_dir=str(tmp_path / "c3"))
    hub_cfg.name = "hub"
    hub = build_data(hub_cfg, TINY_VOCAB, MAX_POS)
    np.testing.assert_array_equal(np.asarray(hub.train.tokens), np.asarray(plain.train.tokens))
    capped_cfg = files_cfg(path, streaming=True, max_tokens=500, cache_dir=str(tmp_path / "c4"))
    capped = build_data(capped_cfg, TINY_VOCAB, MAX_POS)
    assert capped.stats["num_tokens"] == 500
    np.testing.assert_array_equal(np.asarray(capped.train.tokens), np.asarray(plain.train.tokens)[:500])


def test_relative_paths_resolve_against_the_launch_directory(tmp_path, files_cfg, monkeypatch):
    write_jsonl(tmp_path / "rel.jsonl", synthetic_docs(5))
    monkeypatch.chdir(tmp_path)
    cfg = files_cfg("rel.jsonl", seq_len=4)
    cfg.cache_dir = "relcache"
    data = build_data(cfg, TINY_VOCAB, MAX_POS)
    assert Path(data.stats["cache"]).is_relative_to(tmp_path / "relcache")


def test_builtin_tokenizer_trains_on_a_users_files(tmp_path, files_cfg):
    docs = synthetic_docs(200, seed=4)
    write_jsonl(tmp_path / "a.jsonl", docs)
    data = build_data(files_cfg(str(tmp_path / "a.jsonl"), tokenizer="builtin"), 300, MAX_POS)
    assert data.tokenizer.name == "builtin" and data.tokenizer.vocab_size <= 300
    assert stream_text(data) == docs
    again = build_data(files_cfg(str(tmp_path / "a.jsonl"), tokenizer="builtin"), 300, MAX_POS)
    assert not again.stats["built"] and again.tokenizer.fingerprint() == data.tokenizer.fingerprint()


def test_tokenizer_from_a_directory_and_vocab_check(tmp_path, files_cfg, tmp_path_factory):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(20))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_bytes(tokenizer_file(tmp_path_factory).read_bytes())
    data = build_data(files_cfg(str(tmp_path / "a.jsonl"), tokenizer=str(tok_dir), seq_len=4), TINY_VOCAB, MAX_POS)
    assert data.tokenizer.vocab_size == SMALL_VOCAB
    assert data.tokenizer.decode(data.tokenizer.encode("router loss")) == "router loss"
    with pytest.raises(JetMoEError, match="vocab_size"):
        build_data(files_cfg(str(tmp_path / "a.jsonl"), seq_len=4), SMALL_VOCAB - 1, MAX_POS)


# ---- bad input: one clear JetMoEError each ---------------------------------------------------------------

def _bad_inputs(tmp: Path):
    write_jsonl(tmp / "ok.jsonl", synthetic_docs(3))
    (tmp / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken"\n{"text": "x"}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "blank.txt").write_text("\n\n")
    (tmp / "data.csv").write_text("text\nhello\n")
    write_jsonl(tmp / "other.jsonl", ["x"], field="content")
    return {
        "missing path": (dict(path=str(tmp / "nope.jsonl")), "no such file"),
        "empty glob": (dict(path=str(tmp / "*.parquet")), "matches no file"),
        "unknown extension": (dict(path=str(tmp / "data.csv")), "unknown extension '.csv'"),
        "missing text field": (dict(path=str(tmp / "other.jsonl")), "no field 'text'; fields: content"),
        "empty jsonl": (dict(path=str(tmp / "empty.jsonl")), "empty"),
        "blank txt": (dict(path=str(tmp / "blank.txt")), "empty dataset"),
        "malformed json": (dict(path=str(tmp / "bad.jsonl")), "bad.jsonl:2: malformed JSON"),
        "seq_len too long": (dict(path=str(tmp / "ok.jsonl"), seq_len=MAX_POS + 1), "max_position_embeddings"),
        "tokenizer offline": (dict(path=str(tmp / "ok.jsonl"), tokenizer="no-such-org/no-such-tokenizer"),
                              "not found"),
        "tokenizer path": (dict(path=str(tmp / "ok.jsonl"), tokenizer=str(tmp / "missing_tok")), "no such file"),
        "no path": (dict(path=None), "data.path is not set"),
        "tiny data": (dict(path=str(tmp / "ok.jsonl"), seq_len=500), "fewer than data.seq_len+1"),
        "hub offline": (dict(path="no-such-org/no-such-dataset", name="hub", streaming=True), "could not be loaded"),
        "unknown source": (dict(path=str(tmp / "ok.jsonl"), name="s3"), "data.name='s3' is unknown"),
    }


@pytest.mark.parametrize("case", [
    "missing path", "empty glob", "unknown extension", "missing text field", "empty jsonl", "blank txt",
    "malformed json", "seq_len too long", "tokenizer offline", "tokenizer path", "no path", "tiny data",
    "hub offline", "unknown source"])
def test_bad_input_is_one_clear_error(case, tmp_path, files_cfg):
    overrides, expected = _bad_inputs(tmp_path)[case]
    cfg = files_cfg(**overrides) if "path" not in overrides else files_cfg(overrides.pop("path"), **overrides)
    with pytest.raises(JetMoEError) as err:
        build_data(cfg, TINY_VOCAB, MAX_POS)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_bad_input_leaves_no_cache_behind(tmp_path, files_cfg):
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    cfg = files_cfg(str(tmp_path / "bad.jsonl"))
    with pytest.raises(JetMoEError):
        build_data(cfg, TINY_VOCAB, MAX_POS)
    assert not list((tmp_path / "cache" / "tokens").glob("*/meta.json"))
    assert not list((tmp_path / "cache" / "tokens").glob(".*tmp*"))


# ---- build once, others wait ---------------------------------------------------------------------------

_BUILDER = textwrap.dedent("""
    import json, sys
    from jetmoe.data import DataConfig, prepare_tokens
    cfg = DataConfig(**json.loads(sys.argv[1]))
    tok, cache, built = prepare_tokens(cfg, int(sys.argv[2]))
    print(json.dumps({"built": built, "cache": str(cache), "meta": (cache / "meta.json").read_text()}))
""")


@pytest.mark.slow
def test_concurrent_processes_build_the_cache_once(tmp_path, files_cfg):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(2000))
    cfg = files_cfg(str(tmp_path / "a.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _BUILDER, json.dumps(cfg.__dict__), str(TINY_VOCAB)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["built"] for r in results) == 1
    assert len({r["cache"] for r in results}) == 1 and len({r["meta"] for r in results}) == 1
    _, cache, built = prepare_tokens(cfg, TINY_VOCAB)
    assert not built and str(cache) == results[0]["cache"]


@pytest.mark.slow
def test_torchrun_ranks_build_once_and_slice_the_same_global_batches(tmp_path, files_cfg):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(400))
    cfg = files_cfg(str(tmp_path / "a.jsonl"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "helpers" / "data_dist.py"), json.dumps(cfg.__dict__), str(TINY_VOCAB), "8", "2", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"ok": True, "builders": 1}


@pytest.mark.slow
def test_parallel_tokenization_gives_the_same_tokens(tmp_path, files_cfg):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(3000, seed=2))
    path = str(tmp_path / "a.jsonl")
    one = build_data(files_cfg(path, num_proc=1, cache_dir=str(tmp_path / "c1")), TINY_VOCAB, MAX_POS)
    two = build_data(files_cfg(path, num_proc=2, cache_dir=str(tmp_path / "c2")), TINY_VOCAB, MAX_POS)
    np.testing.assert_array_equal(np.asarray(two.train.tokens), np.asarray(one.train.tokens))


def test_config_from_an_omegaconf_node_and_unknown_keys():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"name": "files", "path": ["a.txt", "b.txt"], "seq_len": 32})
    cfg = DataConfig.from_any(node)
    assert cfg.path == ["a.txt", "b.txt"] and cfg.seq_len == 32 and cfg.tokenizer == "builtin"
    with pytest.raises(JetMoEError, match="seqlen"):
        DataConfig.from_any({"seqlen": 3})


@pytest.mark.slow
def test_pretokenize_entry_point_fills_the_cache_and_reports(tmp_path, tmp_path_factory):
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(100))
    tok = tokenizer_file(tmp_path_factory)
    cache = tmp_path / "cache"
    script = str(REPO / "train" / "pretokenize.py")
    ok = subprocess.run([sys.executable, script, "data=files", "data.path=a.jsonl", f"data.tokenizer={tok}",
                         f"data.cache_dir={cache}"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "built now: 100 documents" in ok.stdout and "tokens/s" in ok.stdout
    assert list(cache.glob("tokens/*/tokens.bin"))
    bad = subprocess.run([sys.executable, script, "data=files", "data.path=missing/*.jsonl", f"data.cache_dir={cache}"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "matches no file" in bad.stderr and "Traceback" not in bad.stderr


def test_a_row_whose_text_is_not_text_is_named_and_null_or_empty_rows_are_skipped(tmp_path, tmp_path_factory):
    rows = [{"text": f"document number {i} with some words"} for i in range(40)]
    rows[9], rows[11] = {"text": None}, {"text": ""}
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[7] = {"text": 12345}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(name="files", path=str(bad), seq_len=8, cache_dir=str(tmp_path / "cache"),
                     tokenizer=str(tokenizer_file(tmp_path_factory)))
    with pytest.raises(JetMoEError, match=r"bad\.jsonl:8: data.text_field 'text' holds int 12345, not text"):
        build_data(cfg, SMALL_VOCAB, MAX_POS)
    lines = []
    data = build_data(DataConfig(**{**cfg.__dict__, "path": str(good)}), SMALL_VOCAB, MAX_POS, log=lines.append)
    assert data.stats["num_documents"] == 38 and any("2 null or empty skipped" in line for line in lines), lines


def test_disk_full_while_building_the_cache_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from jetmoe.data import packing

    real = packing.write_token_cache

    def fills_the_disk(ds, tokenizer, out_dir, *args):
        (out_dir / "tokens.bin").write_bytes(b"\0" * 1000)  # some bytes got out before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("jetmoe.data.build.write_token_cache", fills_the_disk)
    write_jsonl(tmp_path / "a.jsonl", synthetic_docs(50))
    cfg = DataConfig(name="files", path=str(tmp_path / "a.jsonl"), seq_len=8, cache_dir=str(tmp_path / "cache"),
                     tokenizer="builtin")
    with pytest.raises(JetMoEError, match=r"the disk holding the data cache .*tokens is full .*GiB needed.*GiB free"):
        build_data(cfg, TINY_VOCAB, MAX_POS)
    tokens = tmp_path / "cache" / "tokens"
    assert [p.name for p in tokens.iterdir() if not p.name.endswith(".lock")] == []  # no partial cache left
    monkeypatch.setattr("jetmoe.data.build.write_token_cache", real)
    assert build_data(cfg, TINY_VOCAB, MAX_POS).stats["num_documents"] == 50  # and the next build works
