"""data=mixture benchmarks, run by bench/data.py: pre-tokenize scaling, loader cost with 10 sources,
opening a 1000-shard cache, and the data side's resident memory at 10M vs 100M tokens."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ["the", "expert", "router", "token", "layer", "attention", "mixture", "of", "gate", "loss", "data", "shard"]


def _tokenizer(tmp: Path) -> Path:
    from jetmoe.data.tokenizer import train_bpe

    rng = np.random.default_rng(0)
    path = tmp / "tok" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    train_bpe((" ".join(rng.choice(WORDS, 50)) for _ in range(2000)), 2048).save(str(path))
    return path


def _text_corpus(root: Path, files: int, docs_per_file: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(files):
        with open(root / f"part{i:03d}.jsonl", "w") as f:
            for _ in range(docs_per_file):
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS, int(rng.integers(50, 400))))}) + "\n")


def pretokenize_scaling(tmp: Path, tok: Path) -> dict:
    from jetmoe.data import DataConfig
    from jetmoe.data.mixture_build import pretokenize_mixture

    _text_corpus(tmp / "text", files=4, docs_per_file=3000)
    out = {}
    for procs in (1, 2):
        cfg = DataConfig(name="mixture", sources={"web": {"path": str(tmp / "text" / "*.jsonl")}}, tokenizer=str(tok),
                         cache_dir=str(tmp / f"pretok{procs}"), num_proc=procs, shard_tokens=1 << 20)
        r = pretokenize_mixture(cfg, 2048)
        out[f"pretokenize_tokens_per_s_{procs}proc"] = round(r["tokens_per_sec"])
    out["pretokenize_scaling_2_over_1"] = round(out["pretokenize_tokens_per_s_2proc"] /
                                                out["pretokenize_tokens_per_s_1proc"], 2)
    out["cpus_available"] = len(os.sched_getaffinity(0))
    return out


def synthetic_cache(tmp: Path, tok: Path, name: str, sources: int, files: int, tokens_per_file: int):
    """A cache written directly in the documented layout (as a converter would): no text is tokenized."""
    from jetmoe.data import DataConfig
    from jetmoe.data.mixture_build import plan_mixture
    from jetmoe.data.shards import check_tokenizer_record

    spec = {}
    for s in range(sources):
        d = tmp / name / "inputs" / f"s{s}"
        d.mkdir(parents=True, exist_ok=True)
        for f in range(files):
            (d / f"{f:04d}.jsonl").write_text('{"text": "placeholder"}\n')
        spec[f"s{s}"] = {"path": str(d / "*.jsonl"), "weight": s + 1}
    cfg = DataConfig(name="mixture", sources=spec, tokenizer=str(tok), cache_dir=str(tmp / name / "cache"),
                     seq_len=256)
    plan = plan_mixture(cfg, 2048)
    check_tokenizer_record(plan.root, plan.tokenizer, create=True)
    rng = np.random.default_rng(2)
    block = rng.integers(1, 2048, size=tokens_per_file, dtype=np.uint16)
    for unit in plan.all_units():
        d = plan.root / unit.uid
        d.mkdir(parents=True, exist_ok=True)
        block.tofile(d / "000000.bin")
        shard = {"name": "000000", "num_tokens": tokens_per_file, "num_documents": 1}
        (d / "done.json").write_text(json.dumps({
            "input": unit.path, "tokenizer_fingerprint": plan.tokenizer.fingerprint(), "dtype": "uint16",
            "eos_token_id": plan.tokenizer.eos_token_id, "num_tokens": tokens_per_file, "num_documents": 1,
            "shards": [shard]}))
    return cfg


_PROBE = r"""
import json, resource, sys, time
from jetmoe.data import DataConfig, build_data
def rss():  # MiB: (anonymous, file-backed) resident memory
    f = dict(l.split(":") for l in open("/proc/self/status") if l.startswith(("RssAnon", "RssFile")))
    return int(f["RssAnon"].split()[0]) / 1024, int(f["RssFile"].split()[0]) / 1024
import datasets, tokenizers, torch  # imported before measuring: their memory does not depend on the corpus
cfg = DataConfig(**json.loads(sys.argv[1]))
before = rss()
t0 = time.perf_counter()
data = build_data(cfg, 2048, 4096)
open_s = time.perf_counter() - t0
loader = data.train_loader(16, 4)
for _ in range(int(sys.argv[2])):
    loader.next_step()
after = rss()
print(json.dumps({"open_s": open_s, "anon_mib": after[0] - before[0], "file_mib": after[1] - before[1],
                  "shards": data.stats["shards"],
                  "tokens": sum(data.stats["num_tokens"].values())}))
"""


def probe(cfg, steps: int) -> dict:
    from dataclasses import asdict

    out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(asdict(cfg)), str(steps)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def loader_ms_per_step(cfg, steps: int) -> float:
    from jetmoe.data import build_data

    loader = build_data(cfg, 2048, 4096).train_loader(16, 4)
    loader.next_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return (time.perf_counter() - t0) / steps * 1e3


def run(tmp: Path, steps: int) -> dict:
    tok = _tokenizer(tmp)
    out = pretokenize_scaling(tmp, tok)
    ten = synthetic_cache(tmp, tok, "ten_sources", sources=10, files=3, tokens_per_file=200_000)
    out["loader_ms_per_step_10_sources"] = round(loader_ms_per_step(ten, steps), 3)
    small = synthetic_cache(tmp, tok, "10M", sources=1, files=1000, tokens_per_file=10_000)
    big = synthetic_cache(tmp, tok, "100M", sources=1, files=1000, tokens_per_file=100_000)
    for label, cfg in (("10M", small), ("100M", big)):
        p = probe(cfg, 200)
        out[f"open_1000_shards_s_{label}"] = round(p["open_s"], 3)
        out[f"data_rss_anon_mib_{label}_tokens"] = round(p["anon_mib"], 1)  # what must not grow
        out[f"data_rss_file_mib_{label}_tokens"] = round(p["file_mib"], 1)  # mapped page cache, reclaimable
    return out
