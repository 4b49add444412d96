#!/usr/bin/env python
"""Fill the tokenized-data cache ahead of a (multi-node) job: `python train/pretokenize.py [overrides]`.

Takes the same overrides as train/pretrain.py (data=..., data.path=..., data.tokenizer=..., model=...,
data.cache_dir=...) and prints tokens, documents, throughput and the cache path. Point data.cache_dir
at a shared filesystem to tokenize once for all nodes, or run this once per node on a local one.

With data=mixture it fills the sharded cache with data.num_proc processes (default: every core this
process may use), printing tokens/s and an ETA; a killed run continues where it stopped. Many nodes:
`--task I --tasks N` (default: $SLURM_ARRAY_TASK_ID and the array's size) gives this process task I's
disjoint share of the input files; launch/pretokenize.sbatch runs N such tasks as a Slurm job array.
"""

import os
import sys
import time


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
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from jetmoe.errors import JetMoEError

    try:
        task, tasks, argv = _task_args(argv)
        cfg = _compose(argv)
        if cfg.data.name == "mixture":
            return _pretokenize_mixture(cfg, task, tasks)
        return _pretokenize(cfg)
    except JetMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _compose(argv: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from jetmoe.errors import JetMoEError
    from jetmoe.training.cli import CONFIG_DIR, _one_line, register

    register()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=argv)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise JetMoEError(f"bad override: {_one_line(e)}") from None
    missing = sorted(k for k in OmegaConf.missing_keys(cfg) if k.startswith(("data.", "model.")))
    if missing:
        raise JetMoEError(f"{', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line")
    return cfg


def _pretokenize(cfg) -> int:
    from jetmoe.data import build_data
    from jetmoe.training.config import data_config

    start = time.perf_counter()
    data = build_data(data_config(cfg), int(cfg.model.vocab_size), int(cfg.model.max_position_embeddings),
                      log=lambda line: print(line, flush=True))
    s = data.stats
    meta_line = "built now" if s["built"] else "already cached"
    print(f"{meta_line}: {s['num_documents']:,} documents, {s['num_tokens']:,} tokens, "
          f"{s['train_samples']:,} train / {s['valid_samples']:,} valid samples of {data.cfg.seq_len} tokens, "
          f"tokenizer {data.tokenizer.name} ({data.tokenizer.vocab_size} tokens), "
          f"{s['num_tokens'] / (time.perf_counter() - start):,.0f} tokens/s overall")
    print(f"cache: {s['cache']}")
    return 0


def _pretokenize_mixture(cfg, task: int, tasks: int) -> int:
    from jetmoe.data.mixture_build import pretokenize_mixture
    from jetmoe.training.config import data_config

    data_cfg = data_config(cfg)
    data_cfg.validate(int(cfg.model.max_position_embeddings))
    r = pretokenize_mixture(data_cfg, int(cfg.model.vocab_size), task, tasks, log=lambda line: print(line, flush=True),
                            special_tokens=(cfg.model.bos_token_id, cfg.model.eos_token_id))
    print(f"task {task} of {tasks}: {r['files']} files, {r['tokens']:,} tokens tokenized now in {r['seconds']:.1f}s "
          f"({r['tokens_per_sec']:,.0f} tokens/s)")
    if r["busy"]:
        print(f"{len(r['busy'])} file(s) were being tokenized by another process: {', '.join(r['busy'][:3])}")
    if r["missing_files"]:
        print(f"cache {r['cache']}: {r['missing_files']} of {r['total_files']} files still to tokenize by other tasks")
    else:
        s = r["stats"]
        print(f"cache complete: {r['cache']}: {s['shards']} shards; tokens per source {s['num_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
