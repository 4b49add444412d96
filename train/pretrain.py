#!/usr/bin/env python
"""Pretrain JetMoE: `python train/pretrain.py [hydra overrides]` (also under torchrun / deepspeed).

With no overrides: the tiny model on the built-in corpus, one CPU process, a few minutes.
See configs/config.yaml for every key, or `python train/pretrain.py --cfg job`.
"""

from jetmoe.training.early_stop import record_stops

record_stops()  # first of all: a stop signal during start-up stops the run after its first step (not lost, not fatal)

from jetmoe.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
