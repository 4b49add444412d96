#!/usr/bin/env python
"""Data pipeline benchmark: tokenize+pack throughput, and the loader's cost relative to a tiny-model step.

    python bench/data.py [--steps 20] [--model-steps 3]

data=mixture (bench/data_mixture.py): pre-tokenize tokens/s with 1 and 2 worker processes, the loader's
ms per step with 10 sources (and its share of the same tiny-model step), the time to open a 1000-shard
cache, and the data side's resident memory for 10M- and 100M-token corpora (it must not grow).

Both numbers are measured in this run on this machine: the loader's time per optimizer step is printed
as a fraction of one jetmoe_tiny training step (forward+backward of every micro-batch + AdamW) with the
default batch (global 16, micro 4, seq_len 256). The target is under 5%.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tokenize_throughput(cache: Path) -> dict:
    from jetmoe.data import DataConfig, build_data
    from jetmoe.data.builtin_corpus import iter_documents

    t0 = time.perf_counter()
    docs = list(iter_documents())
    gather_s = time.perf_counter() - t0
    data = build_data(DataConfig(cache_dir=str(cache)), 2048, 512)
    meta = json.loads((Path(data.stats["cache"]) / "meta.json").read_text())
    out = {"builtin_gather_s": round(gather_s, 2), "builtin_chars": sum(map(len, docs)),
           "builtin_tokens": meta["num_tokens"], "tokenize_pack_tokens_per_s": meta["tokens_per_sec"]}
    # the same text from a jsonl file, through datasets.map with 1 and 2 processes
    corpus = cache / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = next(cache.glob("tokenizers/*/tokenizer.json"))
    for num_proc in (1, 2):
        cfg = DataConfig(name="files", path=str(corpus), tokenizer=str(tok), num_proc=num_proc,
                         cache_dir=str(cache / f"files{num_proc}"))
        t0 = time.perf_counter()
        build_data(cfg, 2048, 512)
        out[f"jsonl_build_tokens_per_s_num_proc{num_proc}"] = round(meta["num_tokens"] / (time.perf_counter() - t0))
    return data, out


def loader_vs_model(data, steps: int, model_steps: int) -> dict:
    import torch

    from jetmoe.model import JetMoEConfig, JetMoEForCausalLM

    torch.manual_seed(0)
    loader = data.train_loader(global_batch_size=16, micro_batch_size=4)
    loader.next_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = loader.next_step()
    loader_s = (time.perf_counter() - t0) / steps

    model = JetMoEForCausalLM(JetMoEConfig.preset("jetmoe_tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step(micro_batches):
        for mb in micro_batches:
            # the loader's labels are already shifted; the model's forward takes unshifted ones
            out = model(mb["input_ids"], labels=mb["input_ids"], position_ids=mb["position_ids"])
            (out.loss / len(micro_batches)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step(batch)  # warm-up
    t0 = time.perf_counter()
    for _ in range(model_steps):
        train_step(batch)
    model_s = (time.perf_counter() - t0) / model_steps
    return {"loader_ms_per_step": round(loader_s * 1e3, 3), "tiny_model_ms_per_step": round(model_s * 1e3, 1),
            "loader_fraction_of_step": float(f"{loader_s / model_s:.3g}")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="loader steps to time")
    parser.add_argument("--model-steps", type=int, default=2, help="tiny-model training steps to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, tok = tokenize_throughput(Path(tmp))
        for k, v in tok.items():
            print(f"{k:42s} {v:,}")
        cost = loader_vs_model(data, args.steps, args.model_steps)
    for k, v in cost.items():
        print(f"{k:42s} {v}")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from data_mixture import run as run_mixture

        mix = run_mixture(Path(tmp) / "mixture", args.steps)
    mix["mixture_loader_fraction_of_step"] = float(f"{mix['loader_ms_per_step_10_sources'] / cost['tiny_model_ms_per_step']:.3g}")
    mix["data_rss_anon_ratio_100M_over_10M"] = round(mix["data_rss_anon_mib_100M_tokens"] /
                                                     max(mix["data_rss_anon_mib_10M_tokens"], 1e-3), 2)
    for k, v in mix.items():
        print(f"{k:42s} {v}")
    ok = cost["loader_fraction_of_step"] < 0.05 and mix["mixture_loader_fraction_of_step"] < 0.05
    print(f"loader cost = {100 * cost['loader_fraction_of_step']:.3g}% (one source), "
          f"{100 * mix['mixture_loader_fraction_of_step']:.3g}% (10 sources) of a tiny-model step "
          f"({'OK' if ok else 'ABOVE'} the 5% target)")
    print(json.dumps({**tok, **cost, **mix}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
