#!/usr/bin/env python
"""Checkpoint -> transformers directory: `python train/export_hf.py CHECKPOINT OUT_DIR [--dtype bf16|fp32]`.

CHECKPOINT is a step folder (checkpoints/step_00000100), a checkpoints folder or a run directory (the
newest intact checkpoint is used). OUT_DIR gets config.json, the safetensors, generation_config.json and
the tokenizer the run trained with (or --tokenizer PATH): it loads with AutoTokenizer,
AutoModelForCausalLM, pipeline("text-generation") and lm-evaluation-harness's `hf` model.
"""

import argparse
import sys

from jetmoe.errors import JetMoEError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step folder, a checkpoints folder or a run directory "
                                           "(newest intact checkpoint is used)")
    parser.add_argument("out_dir", help="new folder for config.json, safetensors shards, index, tokenizer")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or tokenizer folder to include instead of the checkpoint's own")
    args = parser.parse_args()
    from jetmoe.training.checkpoint.export import export_hf

    try:
        export_hf(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size, tokenizer=args.tokenizer)
    except JetMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
