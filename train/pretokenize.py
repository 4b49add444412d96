#!/usr/bin/env python
"""Fill the tokenized-data cache ahead of a (multi-node) job: `python train/pretokenize.py [overrides]`.

Takes the same overrides as train/pretrain.py (data=..., data.path=..., data.tokenizer=..., model=...,
data.cache_dir=...), and your own config files the same way (--config-dir /my/conf or
hydra.searchpath=[file:///my/conf], then data=mydata or +experiment=mine), and prints tokens, documents,
throughput and the cache path. Point data.cache_dir
at a shared filesystem to tokenize once for all nodes, or run this once per node on a local one.

With data=mixture it fills the sharded cache with data.num_proc processes (default: every core this
process may use), printing tokens/s and an ETA; a killed run continues where it stopped. Many nodes:
`--task I --tasks N` (default: $SLURM_ARRAY_TASK_ID and the array's size) gives this process task I's
disjoint share of the input files; launch/pretokenize.sbatch runs N such tasks as a Slurm job array.
`--verify` reads every shard of the complete cache and checks its size, crc32 and token ids against the
record written with it (data.num_proc threads); a damaged shard is one line naming it, exit status 2.
"""

import os
import sys
import time

NEEDS = ("model", "data")  # the sections whose keys must be set and valid


def _task_args(argv: list[str]) -> tuple[int, int, list[str]]:
    """--task I --tasks N (or --task=I --tasks=N), else Slurm's job-array variables, else 0 of 1."""
    from jetmoe.errors import JetMoEError

    found, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        key = arg.split("=", 1)[0]
        if key in ("--task", "--tasks"):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            else:
                raise JetMoEError(f"{key} needs a value")
            try:
                found[key] = int(value)
            except ValueError:
                raise JetMoEError(f"{key}={value!r} is not an integer") from None
        else:
            rest.append(arg)
        i += 1
    env = os.environ
    if "--task" not in found and "SLURM_ARRAY_TASK_ID" in env:
        found["--task"] = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        found.setdefault("--tasks", int(env.get("SLURM_ARRAY_TASK_COUNT", 1)))
    return found.get("--task", 0), found.get("--tasks", 1), rest


def main(argv: list[str]) -> int:
    from jetmoe.errors import JetMoEError
    from jetmoe.log import get_logger
    from jetmoe.training.compose import load

    logger = get_logger("pretokenize")
    if any(a in ("-h", "--help") for a in argv):
        logger.info(__doc__.strip())
        return 0
    try:
        verify = "--verify" in argv
        argv = [a for a in argv if a != "--verify"]
        task, tasks, argv = _task_args(argv)
        config = load(argv, NEEDS)
        if verify:
            return _verify_mixture(config, logger)
        if config.data.name == "mixture":
            return _pretokenize_mixture(config, task, tasks, logger)
        return _pretokenize(config, logger)
    except JetMoEError as e:
        logger.error(f"error: {e}")
        return 2


def _pretokenize(config, logger) -> int:
    from jetmoe.data import build_data

    start = time.perf_counter()
    mc = config.model
    data = build_data(config.data, mc.vocab_size, mc.max_position_embeddings, log=logger.info)
    s = data.stats
    meta_line = "built now" if s["built"] else "already cached"
    logger.info(f"{meta_line}: {s['num_documents']:,} documents, {s['num_tokens']:,} tokens, "
                f"{s['train_samples']:,} train / {s['valid_samples']:,} valid samples of {data.cfg.seq_len} tokens, "
                f"tokenizer {data.tokenizer.name} ({data.tokenizer.vocab_size} tokens), "
                f"{s['num_tokens'] / (time.perf_counter() - start):,.0f} tokens/s overall")
    logger.info(f"cache: {s['cache']}")
    return 0


def _verify_mixture(config, logger) -> int:
    from jetmoe.data.mixture_build import verify_mixture
    from jetmoe.errors import JetMoEError

    if config.data.name != "mixture":
        raise JetMoEError(f"--verify checks the sharded cache of data=mixture; data={config.data.name} keeps one "
                          "token file per source, rebuilt when its inputs change")
    mc = config.model
    r = verify_mixture(config.data, mc.vocab_size, log=logger.info, special_tokens=(mc.bos_token_id, mc.eos_token_id))
    logger.info(f"cache verified: {r['cache']}: {r['shards']} shards, {r['bytes'] / 1e9:.2f} GB read in "
                f"{r['seconds']:.1f}s ({r['bytes'] / 1e9 / max(r['seconds'], 1e-9):.2f} GB/s)")
    return 0


def _pretokenize_mixture(config, task: int, tasks: int, logger) -> int:
    from jetmoe.data.mixture_build import pretokenize_mixture

    mc = config.model
    r = pretokenize_mixture(config.data, mc.vocab_size, task, tasks, log=logger.info,
                            special_tokens=(mc.bos_token_id, mc.eos_token_id))
    logger.info(f"task {task} of {tasks}: {r['files']} files, {r['tokens']:,} tokens tokenized now in "
                f"{r['seconds']:.1f}s ({r['tokens_per_sec']:,.0f} tokens/s)")
    if r["busy"]:
        logger.info(f"{len(r['busy'])} file(s) were being tokenized by another process: {', '.join(r['busy'][:3])}")
    if r["missing_files"]:
        logger.info(f"cache {r['cache']}: {r['missing_files']} of {r['total_files']} files still to tokenize by "
                    "other tasks")
    else:
        s = r["stats"]
        logger.info(f"cache complete: {r['cache']}: {s['shards']} shards; tokens per source {s['num_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
