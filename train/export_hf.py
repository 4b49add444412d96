#!/usr/bin/env python
"""Checkpoint -> transformers directory: `python train/export_hf.py CHECKPOINT OUT_DIR [--dtype bf16|fp32]`.

CHECKPOINT is a step folder (checkpoints/step_00000100) or a checkpoints folder (its newest intact
checkpoint is used). The result loads with transformers' JetMoeForCausalLM.from_pretrained(OUT_DIR).
"""

import argparse
import sys

from jetmoe.errors import JetMoEError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step folder, or a checkpoints folder (newest intact one is used)")
    parser.add_argument("out_dir", help="new folder for config.json + safetensors shards + index")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    args = parser.parse_args()
    from jetmoe.training.checkpoint.export import export_hf

    try:
        export_hf(args.checkpoint, args.out_dir, args.dtype, args.max_shard_size)
    except JetMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
