#!/usr/bin/env python
"""Pretrain JetMoE: `python train/pretrain.py [hydra overrides]` (also under torchrun / deepspeed).

With no overrides: the tiny model on the built-in corpus, one CPU process, a few minutes.
See configs/config.yaml for every key, or `python train/pretrain.py --cfg job`.
"""

from jetmoe.training.cli import main

if __name__ == "__main__":
    main()
