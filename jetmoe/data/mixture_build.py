"""`data=mixture` set-up: sources -> input units -> tokenizer -> (pre-tokenize | open the complete cache)."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from jetmoe.data.config import DataConfig
from jetmoe.paths import resolve_cache_dir, resolve_user_path
from jetmoe.data.mixture import MixtureData, split_source
from jetmoe.data.mixture_config import MixtureSpec, parse_mixture
from jetmoe.data.shard_check import check_sizes, verify_units
from jetmoe.data.shards import (Unit, check_tokenizer_record, iter_texts, plan_units, read_done, token_dtype,
                                tokenizer_root)
from jetmoe.data.builtin_reuse import inputs_record, reusable_builtin
from jetmoe.data.tokenizer import builtin_path, make_tokenizer
from jetmoe.errors import JetMoEError


@dataclass
class MixturePlan:
    spec: MixtureSpec
    units: dict[str, list[Unit]]  # source name -> its input units
    tokenizer: object
    root: Path  # the tokenizer's tree in the cache
    hf_cache: Path
    tokenizer_record: Optional[dict] = None  # extra fields of the tree's tokenizer.json (the builtin BPE's inputs)
    vocab_size: Optional[int] = None  # the model's: a cached token id at or past it is refused

    def all_units(self) -> list[Unit]:
        return [u for name in self.spec.names for u in self.units[name]]


def _round_robin_texts(units: list[Unit], hf_cache: Path) -> Callable[[], Iterator[str]]:
    """Texts for training the builtin BPE: one batch from each source's files in turn."""
    def texts() -> Iterator[str]:
        streams = [itertools.chain.from_iterable(iter_texts(u, hf_cache) for u in group) for group in
                   _group(units)]
        for batch in itertools.chain.from_iterable(itertools.zip_longest(*streams)):
            if batch is not None:
                yield batch
    return texts


def _group(units: list[Unit]) -> list[list[Unit]]:
    groups: dict[str, list[Unit]] = {}
    for u in units:
        groups.setdefault(u.source, []).append(u)
    return list(groups.values())


def check_special_tokens(tokenizer, bos_token_id: Optional[int], eos_token_id: Optional[int]) -> None:
    """The model config's BOS/EOS ids must be the tokenizer's (generation and HF export rely on them)."""
    for key, model_id, tok_id in (("eos_token_id", eos_token_id, tokenizer.eos_token_id),
                                  ("bos_token_id", bos_token_id, getattr(tokenizer, "bos_token_id", None))):
        if model_id is not None and tok_id is not None and int(model_id) != int(tok_id):
            raise JetMoEError(f"model.{key}={model_id} but tokenizer {tokenizer.name} has {key}={tok_id}; "
                              f"set model.{key}={tok_id} or use the tokenizer the model was made for")


def plan_mixture(cfg: DataConfig, vocab_size: int, special_tokens: Optional[tuple] = None, log=None) -> MixturePlan:
    """Check the config, list every source's input files (stat only) and load the tokenizer."""
    spec = parse_mixture(cfg.sources, cfg.phases)
    if cfg.max_tokens is not None:
        raise JetMoEError("data.max_tokens applies to a single source; with data=mixture, shape the data by "
                          "data.sources.<name>.path and the weights")
    cache_root = resolve_cache_dir(cfg.cache_dir)
    hf_cache = cache_root / "hf"
    units = {s.name: plan_units(s) for s in spec.sources}
    flat = [u for name in spec.names for u in units[name]]
    corpus_key = hashlib.sha256(" ".join(u.uid for u in flat).encode()).hexdigest()[:16]
    texts, record = _round_robin_texts(flat, hf_cache), None
    if cfg.tokenizer == "builtin":
        tokenizer_file = reusable_builtin(tokenizer_root(cache_root, "builtin"), cache_root, flat, vocab_size, log)
        tokenizer_file = tokenizer_file or builtin_path(cache_root, corpus_key, vocab_size)
        record = inputs_record(flat, vocab_size, tokenizer_file, cache_root)
        tokenizer = make_tokenizer("builtin", vocab_size, cache_root, None, texts, resolve_user_path,
                                   builtin_file=tokenizer_file)
    else:
        tokenizer = make_tokenizer(cfg.tokenizer, vocab_size, cache_root, corpus_key, texts, resolve_user_path)
        if special_tokens is not None:  # a user's tokenizer must match the model (the builtin BPE is made for it)
            check_special_tokens(tokenizer, *special_tokens)
    return MixturePlan(spec, units, tokenizer, tokenizer_root(cache_root, tokenizer.name), hf_cache, record,
                       vocab_size)


def missing_units(plan: MixturePlan) -> list[Unit]:
    return [u for u in plan.all_units() if read_done(plan.root / u.uid) is None]


def _missing_error(plan: MixturePlan, missing: list[Unit]) -> JetMoEError:
    by_source: dict[str, list[str]] = {}
    for u in missing:
        by_source.setdefault(u.source, []).append(Path(u.path).name)
    listed = "; ".join(f"{name}: {len(files)} ({', '.join(files[:3])}{' ...' if len(files) > 3 else ''})"
                       for name, files in by_source.items())
    return JetMoEError(
        f"{len(missing)} of {len(plan.all_units())} input files are not pre-tokenized in {plan.root} [{listed}]; "
        f"run python train/pretokenize.py with the same data and model overrides (or launch/pretokenize.sbatch)")


def open_mixture(cfg: DataConfig, plan: MixturePlan, seed: int, log=None) -> MixtureData:
    check_tokenizer_record(plan.root, plan.tokenizer, create=False)
    missing = missing_units(plan)
    if missing:
        raise _missing_error(plan, missing)
    fingerprint, dtype = plan.tokenizer.fingerprint(), token_dtype(plan.tokenizer.vocab_size)
    train, valid, stats = [], [], {"num_tokens": {}, "num_documents": {}, "train_samples": {}, "valid_samples": {},
                                   "shards": 0, "cache": str(plan.root)}
    checked = []
    for name in plan.spec.names:
        paths, sizes, docs = [], [], 0
        for unit in plan.units[name]:
            unit_dir = plan.root / unit.uid
            done = read_done(unit_dir)
            if done["tokenizer_fingerprint"] != fingerprint or done["dtype"] != dtype.name:
                raise JetMoEError(
                    f"{unit_dir} ({unit.path}) was tokenized with tokenizer fingerprint {done['tokenizer_fingerprint']} "
                    f"({done['dtype']}), data.tokenizer={plan.tokenizer.name} has {fingerprint} ({dtype.name}); "
                    f"delete that directory and run train/pretokenize.py again")
            check_sizes(unit_dir, done, dtype, plan.vocab_size)
            checked.append((unit_dir, done))
            for shard in done["shards"]:
                paths.append(unit_dir / f"{shard['name']}.bin")
                sizes.append(int(shard["num_tokens"]))
            docs += int(done["num_documents"])
        if docs == 0:
            raise JetMoEError(f"data.sources.{name} holds no documents ({len(plan.units[name])} file(s) under "
                              f"{plan.spec.sources[plan.spec.names.index(name)].path}); check the path and text_field")
        t, v = split_source(paths, sizes, dtype, cfg.seq_len, plan.tokenizer.eos_token_id, cfg.valid_fraction,
                            plan.vocab_size)
        train.append(t)
        valid.append(v)
        stats["num_tokens"][name], stats["num_documents"][name] = sum(sizes), docs
        stats["train_samples"][name], stats["valid_samples"][name] = len(t), len(v) if v is not None else 0
        stats["shards"] += len(paths)
    if cfg.verify == "full":
        verify_units(checked, dtype, plan.vocab_size, default_num_proc(cfg.num_proc))
    return MixtureData(cfg, plan.spec, plan.tokenizer, train, valid, seed, stats, log)


def build_mixture_data(cfg: DataConfig, vocab_size: int, seed: int = 0, *, log=None,
                       special_tokens: Optional[tuple] = None) -> MixtureData:
    """Every rank calls this; nothing is tokenized here: a missing shard is a one-line error saying what to run."""
    plan = plan_mixture(cfg, vocab_size, special_tokens, log)
    data = open_mixture(cfg, plan, seed, log)
    if log:
        s = data.stats
        log(f"mixture of {len(plan.spec.names)} sources, {sum(s['num_tokens'].values()):,} tokens in {s['shards']} "
            f"shards ({s['cache']}); phases {plan.spec.describe()}")
    return data


def default_num_proc(num_proc: Optional[int]) -> int:
    if num_proc is not None:
        return max(1, int(num_proc))
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pretokenize_mixture(cfg: DataConfig, vocab_size: int, task_index: int = 0, num_tasks: int = 1, *, log=None,
                        special_tokens: Optional[tuple] = None, progress_every_s: float = 10.0) -> dict:
    """Tokenize this task's share of every source's files; when the cache is then complete, open it as a check."""
    from jetmoe.data.pretokenize import assign, pretokenize_units

    plan = plan_mixture(cfg, vocab_size, special_tokens, log)
    check_tokenizer_record(plan.root, plan.tokenizer, create=True, extra=plan.tokenizer_record)
    mine = assign(plan.all_units(), task_index, num_tasks)
    num_proc = default_num_proc(cfg.num_proc)
    if log:
        log(f"task {task_index} of {num_tasks}: {len(mine)} of {len(plan.all_units())} input files "
            f"({sum(u.size_bytes for u in mine) / 1e9:.2f} GB), {num_proc} processes, tokenizer {plan.tokenizer.name}, "
            f"into {plan.root}")
    result = pretokenize_units(mine, plan.tokenizer, plan.root, cfg.shard_tokens, num_proc, log, plan.hf_cache,
                               progress_every_s)
    missing = missing_units(plan)
    result.update(files=len(mine), total_files=len(plan.all_units()), missing_files=len(missing),
                  cache=str(plan.root))
    if not missing:
        result["stats"] = open_mixture(cfg, plan, 0).stats
    return result


def verify_mixture(cfg: DataConfig, vocab_size: int, *, log=None, special_tokens: Optional[tuple] = None) -> dict:
    """`pretokenize.py --verify`: read every shard of the complete cache and check it against its record."""
    import time

    plan = plan_mixture(cfg, vocab_size, special_tokens)
    check_tokenizer_record(plan.root, plan.tokenizer, create=False)
    missing = missing_units(plan)
    if missing:
        raise _missing_error(plan, missing)
    dtype = token_dtype(plan.tokenizer.vocab_size)
    units = [(plan.root / u.uid, read_done(plan.root / u.uid)) for u in plan.all_units()]
    for unit_dir, done in units:
        check_sizes(unit_dir, done, dtype, vocab_size)
    num_threads = default_num_proc(cfg.num_proc)
    if log:
        log(f"verifying {sum(len(d['shards']) for _, d in units)} shards in {plan.root} with {num_threads} threads")
    start = time.perf_counter()
    nbytes = verify_units(units, dtype, vocab_size, num_threads)
    seconds = time.perf_counter() - start
    return {"shards": sum(len(d["shards"]) for _, d in units), "bytes": nbytes, "seconds": seconds,
            "cache": str(plan.root)}
