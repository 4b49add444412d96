#!/usr/bin/env python
"""Fill the tokenized-data cache ahead of a (multi-node) job: `python train/pretokenize.py [overrides]`.

Takes the same overrides as train/pretrain.py (data=..., data.path=..., data.tokenizer=..., model=...,
data.cache_dir=...) and prints tokens, documents, throughput and the cache path. Point data.cache_dir
at a shared filesystem to tokenize once for all nodes, or run this once per node on a local one.
"""

import sys
import time


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    from jetmoe.errors import JetMoEError

    try:
        cfg = _compose(argv)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
