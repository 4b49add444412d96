"""data=mixture: per-step weights and phases, layout independence, exact resume, sharded pre-tokenization."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.data_corpus import synthetic_docs, write_jsonl
from helpers.data_mixture import MAX_POS, VOCAB, mixture_cfg, write_corpus, write_zst

from jetmoe.data import build_data
from jetmoe.data.mixture_build import plan_mixture, pretokenize_mixture
from jetmoe.data.mixture_config import parse_mixture
from jetmoe.data.mixture_schedule import webster_counts
from jetmoe.data.pretokenize import assign
from jetmoe.errors import JetMoEError, ResumeMismatch

REPO = Path(__file__).resolve().parents[1]
PHASES = [{"start_step": 0, "weights": {"web": 0.7, "code": 0.3}},
          {"start_step": 4, "weights": {"web": 0.25, "code": 0.75}}]


@pytest.fixture
def corpus(tmp_path, tmp_path_factory):
    sources = write_corpus(tmp_path / "corpus")

    def make(**kw):
        return mixture_cfg(tmp_path, tmp_path_factory, kw.pop("sources", sources), **kw)

    return make


def built(cfg, seed=0):
    pretokenize_mixture(cfg, VOCAB)
    return build_data(cfg, VOCAB, MAX_POS, seed=seed)


def cache_files(cfg) -> dict:
    root = Path(cfg.cache_dir) / "mixture"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != ".lock" and not p.name.endswith("tokenizer.json")}


# ---- weights and phases -------------------------------------------------------------------------------

def test_two_phase_shares_follow_the_weights_step_by_step(corpus):
    data = built(corpus(phases=PHASES))
    loader = data.train_loader(global_batch_size=20, micro_batch_size=5)
    code = data.names.index("code")
    for step in range(10):
        sources, _ = loader.rank_samples()
        weight = PHASES[1 if step >= 4 else 0]["weights"]["code"]  # start_step 4: the 5th step is the first
        assert abs(int((sources == code).sum()) - weight * 20) <= 1, step
        loader.next_step()
    tokens = loader.tokens_by_source()
    assert sum(tokens.values()) == 10 * 20 * 16
    assert tokens["code"] == (4 * 6 + 6 * 15) * 16


def test_webster_counts_never_shrink_and_stay_near_the_quota():
    weights = tuple(round(w * 1e9) for w in (0.64, 0.25, 0.08, 0.01, 0.01, 0.01))
    previous = [0] * len(weights)
    for n in range(0, 3000, 13):
        counts = webster_counts(weights, n)
        assert sum(counts) == n
        assert all(c >= p for c, p in zip(counts, previous))
        assert max(abs(c - w / sum(weights) * n) for c, w in zip(counts, weights)) < 2
        previous = counts


def test_same_global_batch_for_any_dp_and_micro_batch(corpus):
    data = built(corpus(phases=PHASES))

    def global_windows(dp, micro, steps=7):
        loaders = [data.train_loader(24, micro, r, dp) for r in range(dp)]
        out = []
        for _ in range(steps):
            parts = [np.concatenate([mb["input_ids"].numpy() for mb in ld.next_step()]) for ld in loaders]
            out.append(np.concatenate(parts))
        return np.stack(out)

    reference = global_windows(1, 4)
    assert np.array_equal(reference, global_windows(2, 6))
    assert np.array_equal(reference, global_windows(3, 2))
    assert np.array_equal(reference, global_windows(2, 12))
    other_seed = build_data(data.cfg, VOCAB, MAX_POS, seed=1).train_loader(24, 4).next_step()
    assert not np.array_equal(reference[0][:4], other_seed[0]["input_ids"].numpy())  # the check can fail


def test_a_source_is_drawn_without_replacement_then_reshuffled_with_a_warning(corpus):
    data = built(corpus(phases=[{"start_step": 0, "weights": {"code": 1}}]))
    lines = []
    data.log = lines.append
    n = len(data.train[data.names.index("code")])
    loader = data.train_loader(n, n)  # one step = one pass over the source
    first, _ = loader.rank_samples()[1], loader.next_step()
    second, _ = loader.rank_samples()[1], loader.next_step()
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert not np.array_equal(first, second)  # a new permutation, not a replay
    assert loader.epochs_by_source()["code"] == 2
    assert any("'code' ran out of samples" in line for line in lines)


# ---- resume ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("resume_at", [3, 4, 5])  # the phase starts at 4: before, exactly at and after it
def test_resume_is_exact_around_the_phase_boundary(corpus, resume_at):
    data = built(corpus(phases=PHASES))
    straight = data.train_loader(20, 5)
    for _ in range(resume_at):
        straight.next_step()
    state = json.loads(json.dumps(straight.state_dict()))  # as the checkpoint stores it
    expected = [np.concatenate([mb["input_ids"].numpy() for mb in straight.next_step()]) for _ in range(3)]
    resumed = [data.train_loader(20, 10, r, 2) for r in range(2)]  # and with another layout
    for ld in resumed:
        ld.load_state_dict(state)
    for want in expected:
        got = np.concatenate([mb["input_ids"].numpy() for ld in resumed for mb in ld.next_step()])
        assert np.array_equal(got, want)
    assert resumed[0].tokens_by_source() == straight.tokens_by_source()


def test_resume_allows_future_phases_to_change_but_not_the_past(corpus):
    data = built(corpus(phases=PHASES))
    loader = data.train_loader(20, 5)
    for _ in range(3):
        loader.next_step()
    state = loader.state_dict()
    later = built(corpus(phases=[PHASES[0], {**PHASES[1], "start_step": 9}])).train_loader(20, 5)
    later.load_state_dict(state)  # the switch at 4 has not happened yet at step 3: may move
    earlier = built(corpus(phases=[PHASES[0], {**PHASES[1], "start_step": 2}])).train_loader(20, 5)
    with pytest.raises(ResumeMismatch, match=r"data.phases: the weights of steps 1-3 were .* now; only phases that "
                                             r"start at or after step 3 may change on resume"):
        earlier.load_state_dict(state)


# ---- pre-tokenization -------------------------------------------------------------------------------------

def test_compressed_inputs_and_recursive_globs_give_the_same_tokens(tmp_path, tmp_path_factory):
    import gzip

    docs = synthetic_docs(60, seed=3)
    (tmp_path / "plain").mkdir()
    plain = write_jsonl(tmp_path / "plain" / "a.jsonl", docs)
    deep = tmp_path / "deep" / "x" / "y"
    deep.mkdir(parents=True)
    with gzip.open(deep / "a.jsonl.gz", "wt") as f:
        f.write(plain.read_text())
    write_zst(tmp_path / "deep" / "b.jsonl.zst", docs)
    with gzip.open(deep / "c.json.gz", "wt") as f:
        json.dump([{"text": d} for d in docs], f)
    with gzip.open(deep / "d.txt.gz", "wt") as f:
        f.write("\n\n".join(docs))
    tokens = {}
    for name, path, extra in [("plain", plain, {}), ("gz", deep / "a.jsonl.gz", {}), ("zst", tmp_path / "deep" / "*.zst", {}),
                              ("json.gz", tmp_path / "deep" / "**" / "*.json.gz", {}),
                              ("txt.gz", tmp_path / "deep" / "**" / "*.txt.gz", {"txt_sample_by": "paragraph"})]:
        cfg = mixture_cfg(tmp_path, tmp_path_factory, {"s": {"path": str(path), **extra}}, valid_fraction=0.0)
        data = built(cfg)
        tokens[name] = np.concatenate([np.asarray(np.memmap(p, dtype=data.train[0].dtype, mode="r"))
                                       for p in data.train[0].paths])
    for name, t in tokens.items():
        assert np.array_equal(t, tokens["plain"]), name


@pytest.mark.slow
def test_parallel_pre_tokenization_writes_the_same_shards(corpus, tmp_path):
    one = corpus(cache_dir=str(tmp_path / "one"))
    two = corpus(cache_dir=str(tmp_path / "two"), num_proc=2)
    pretokenize_mixture(one, VOCAB)
    pretokenize_mixture(two, VOCAB)
    files = cache_files(one)
    assert len([f for f in files if f.endswith(".bin")]) > 4  # several shards per file
    assert files == cache_files(two)


def test_a_killed_pre_tokenization_resumes_to_the_same_bytes(corpus, tmp_path, monkeypatch):
    import jetmoe.data.pretokenize as pt

    clean = corpus(cache_dir=str(tmp_path / "clean"))
    pretokenize_mixture(clean, VOCAB)
    cfg = corpus(cache_dir=str(tmp_path / "killed"))
    real, batches = pt.write_unit, []

    def dying(unit, tokenizer, root, shard_tokens, progress=None, hf_cache=None):
        def tick(tokens, documents):
            batches.append(tokens)
            if len(batches) == 2:
                raise KeyboardInterrupt  # killed in the second file, after some of its shards closed
        return real(unit, tokenizer, root, shard_tokens, tick, hf_cache)

    monkeypatch.setattr(pt, "write_unit", dying)
    with pytest.raises(KeyboardInterrupt):
        pretokenize_mixture(cfg, VOCAB)
    monkeypatch.undo()
    unit_dirs = [d for d in (tmp_path / "killed").rglob("*") if d.is_dir() and (d / "000000.json").exists()]
    unit_dirs = [d for d in unit_dirs if not (d / "done.json").exists()]
    assert len(unit_dirs) == 1
    with pytest.raises(JetMoEError, match=r"^3 of 4 input files are not pre-tokenized"):
        build_data(cfg, VOCAB, MAX_POS)
    partial = unit_dirs[0]
    (partial / ".000009.bin.tmp-1").write_bytes(b"half a shard")  # what a SIGKILL mid-write leaves
    last = max(int(p.stem) for p in partial.glob("*.json") if p.stem.isdigit())
    (partial / f"{last:06d}.json").unlink()  # a shard renamed but its record not yet written
    pretokenize_mixture(cfg, VOCAB)
    assert cache_files(cfg) == cache_files(clean)


@pytest.mark.slow
def test_a_two_task_array_fills_one_cache(corpus, tmp_path):
    cfg = corpus()
    data_units = plan_mixture(cfg, VOCAB).all_units()
    shares = [assign(data_units, i, 2) for i in range(2)]
    assert not {u.uid for u in shares[0]} & {u.uid for u in shares[1]}
    assert {u.uid for s in shares for u in s} == {u.uid for u in data_units}
    script = str(REPO / "train" / "pretokenize.py")
    overrides = ["data=mixture", f"data.tokenizer={cfg.tokenizer}", f"data.cache_dir={cfg.cache_dir}",
                 "data.seq_len=16", "data.shard_tokens=1500", "data.num_proc=1",
                 f"data.sources.web.path={cfg.sources['web']['path']}", f"data.sources.code.path={cfg.sources['code']['path']}",
                 "model.bos_token_id=null", "model.eos_token_id=0"]
    # task 0 as the job array runs it (no Slurm here: the array's variables are what sbatch would set)
    first = subprocess.run(["bash", str(REPO / "launch" / "pretokenize.sbatch"), *overrides], capture_output=True,
                           text=True, timeout=180, cwd=REPO,
                           env={**os.environ, "PYTHON": sys.executable, "SLURM_ARRAY_TASK_ID": "4",
                                "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert first.returncode == 0, first.stderr[-2000:]
    assert "task 0 of 2" in first.stdout and "tokens/s" in first.stdout and "ETA" in first.stdout
    assert "still to tokenize by other tasks" in first.stdout
    with pytest.raises(JetMoEError, match="not pre-tokenized"):
        build_data(cfg, VOCAB, MAX_POS)
    second = subprocess.run([sys.executable, script, "--task", "1", "--tasks", "2", *overrides], capture_output=True,
                            text=True, timeout=180)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "cache complete" in second.stdout
    assert build_data(cfg, VOCAB, MAX_POS).stats["shards"] > 4


def test_a_1000_shard_cache_opens_lazily(tmp_path, tmp_path_factory):
    """Shards are memory-mapped on first use: opening maps none of them (timing is in bench/data.py)."""
    from jetmoe.data.mixture import split_source

    paths = []
    for i in range(1000):
        p = tmp_path / f"{i:06d}.bin"
        np.full(40, i % 300, dtype=np.uint16).tofile(p)
        paths.append(p)
    train, _ = split_source(paths, [40] * 1000, np.dtype(np.uint16), 16, 0, 0.0)
    assert len(train) == 2000 and not train._maps
    assert train.windows([1999])[0][0] == 999 % 300 and len(train._maps) == 1


# ---- bad input -------------------------------------------------------------------------------------------

def _bad(tmp: Path, sources: dict):
    write_jsonl(tmp / "other.jsonl", synthetic_docs(5), field="content")
    (tmp / "blank.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    web_phase = lambda w: {"sources": sources, "phases": [{"start_step": 0, "weights": w}]}  # noqa: E731
    two_phases = lambda a, b: {"sources": sources, "phases": [{"start_step": a, "weights": {"web": 1}},  # noqa: E731
                                                             {"start_step": b, "weights": {"code": 1}}]}
    return {
        "negative weight": ({"sources": {**sources, "web": {**sources["web"], "weight": -1}}}, "web.weight=-1 is negative"),
        "nan weight": (web_phase({"web": float("nan")}), "is not a number"),
        "text weight": (web_phase({"web": "lots"}), "'lots' is not a number"),
        "all zero": (web_phase({"web": 0, "code": 0}), "are all zero"),
        "unknown name": (web_phase({"web": 1, "wiki": 1}), "unknown source(s) ['wiki']"),
        "not increasing": (two_phases(0, 0), "phases[1].start_step=0 does not increase"),
        "not from 0": (two_phases(5, 9), "the first phase must start at 0"),
        "no match": ({"sources": {**sources, "code": {"path": str(tmp / "nothing" / "**" / "*.jsonl")}}},
                     "data.sources.code: data.path glob"),
        "no rows": ({"sources": {**sources, "code": {"path": str(tmp / "blank.jsonl")}}},
                    "data.sources.code holds no documents"),
        "field in one file": ({"sources": {**sources, "web": {"path": [sources["web"]["path"], str(tmp / "other.jsonl")]}}},
                              "other.jsonl has no field 'text'; fields: content"),
    }


@pytest.mark.parametrize("case", ["negative weight", "nan weight", "text weight", "all zero", "unknown name",
                                  "not increasing", "not from 0", "no match", "no rows", "field in one file"])
def test_bad_mixture_input_is_one_clear_line(case, corpus, tmp_path):
    sources = corpus().sources
    overrides, expected = _bad(tmp_path, sources)[case]
    cfg = corpus(**overrides)
    with pytest.raises(JetMoEError) as err:
        pretokenize_mixture(cfg, VOCAB)
        build_data(cfg, VOCAB, MAX_POS)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_cache_made_with_another_tokenizer_is_refused(corpus, tmp_path):
    cfg = corpus()
    pretokenize_mixture(cfg, VOCAB)
    record = next(Path(cfg.cache_dir).rglob("tokenizer.json"))
    record.write_text(json.dumps({**json.loads(record.read_text()), "fingerprint": "0123456789abcdef"}))
    with pytest.raises(JetMoEError, match="made with a different tokenizer"):
        build_data(cfg, VOCAB, MAX_POS)
    before = cache_files(cfg)
    with pytest.raises(JetMoEError, match="made with a different tokenizer"):
        pretokenize_mixture(cfg, VOCAB)
    assert cache_files(cfg) == before  # nothing written over


def test_model_special_tokens_must_match_the_tokenizer(corpus):
    cfg = corpus()
    pretokenize_mixture(cfg, VOCAB)
    with pytest.raises(JetMoEError, match=r"model.eos_token_id=2 but tokenizer .* has eos_token_id=0"):
        build_data(cfg, VOCAB, MAX_POS, special_tokens=(None, 2))
    build_data(cfg, VOCAB, MAX_POS, special_tokens=(None, 0))


@pytest.mark.slow
def test_the_8b_recipe_has_the_papers_phases_and_requires_a_tokenizer(tmp_path, run_config):
    data = run_config("+experiment=jetmoe_8b_96xh100", *[
        f"data.sources.{n}.path=/x" for n in ("refinedweb", "github", "pile", "pes2o", "arxiv", "openwebmath",
                                               "wikipedia", "math", "textbook", "nl_sft", "code_sft")], needs=()).data
    spec = parse_mixture(data.sources, data.phases)
    phases = spec.describe()
    assert [p["start_step"] for p in phases] == [0, 238419]
    assert phases[0]["weights"]["refinedweb"] == pytest.approx(0.64) and phases[1]["weights"]["github"] == pytest.approx(0.20)
    assert "pes2o" not in phases[1]["weights"]
    with pytest.raises(JetMoEError, match=r"^data.tokenizer must be set"):
        data.validate(4096)
    script = REPO / "train" / "pretokenize.py"
    out = subprocess.run([sys.executable, str(script), "+experiment=jetmoe_8b_96xh100"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "data.sources.arxiv.path" in out.stderr and out.stderr.count("\n") == 1
