#!/usr/bin/env python
"""Checkpoint -> transformers directory: `python train/export_hf.py CHECKPOINT OUT_DIR [--dtype bf16|fp32] [overrides]`.

CHECKPOINT is a step folder (checkpoints/step_00000100), a checkpoints folder or a run directory (the
newest intact checkpoint is used). OUT_DIR gets config.json, the safetensors, generation_config.json and
the tokenizer the run trained with (or --tokenizer PATH): it loads with AutoTokenizer,
AutoModelForCausalLM, pipeline("text-generation") and lm-evaluation-harness's `hf` model.

Config overrides, your own config files included (--config-dir /my/conf or hydra.searchpath=[file:///my/conf],
then data=mydata or +experiment=mine), compose the run config as train/pretrain.py does: its data.tokenizer,
unless builtin (the checkpoint holds the builtin one), is the tokenizer to include, as --tokenizer would say.
"""

import argparse
import sys

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger

logger = get_logger("export_hf")


def tokenizer_from_config(overrides: list[str], config_dir: str | None, config_name: str | None) -> str | None:
    """data.tokenizer of the run config these arguments compose (None when they name none, or the builtin one)."""
    if not overrides and config_dir is None and config_name is None:
        return None
    from jetmoe.training.compose import load

    argv = overrides + (["--config-dir", config_dir] if config_dir else []) + \
        (["--config-name", config_name] if config_name else [])
    tokenizer = load(argv, needs=()).data.tokenizer
    return None if tokenizer in (None, "", "builtin") else tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step folder, a checkpoints folder or a run directory "
                                           "(newest intact checkpoint is used)")
    parser.add_argument("out_dir", help="new folder for config.json, safetensors shards, index, tokenizer")
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value), as train/pretrain.py takes")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or tokenizer folder to include instead of the checkpoint's own")
    parser.add_argument("--config-dir", "-cd", default=None, help="a folder of your own config files")
    parser.add_argument("--config-name", "-cn", default=None, help="a primary config other than configs/config.yaml")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    from jetmoe.training.checkpoint.export import export_hf

    try:
        tokenizer = args.tokenizer or tokenizer_from_config(args.overrides, args.config_dir, args.config_name)
        export_hf(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, tokenizer=tokenizer)
    except JetMoEError as e:
        logger.error(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
