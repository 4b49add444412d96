"""torchrun entry for the compile tests: train through the real Trainer, then rank 0 saves the metrics rows and
Dynamo's counters after every step (frames compiled: a growth after warm-up is a recompilation).

usage: torchrun ... tests/helpers/compile_e2e.py OUT_DIR [hydra overrides]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: str, overrides: list[str]) -> None:
    from trainer_setup import trainer_from_args

    from jetmoe.parallel.compile import compile_stats

    out = Path(out_dir)
    trainer, cfg = trainer_from_args([str(out / "run"), *overrides])
    trainer.checkpoint.resume()
    rows, stats = [], []
    for _ in range(cfg.train.max_steps):
        rows.append(trainer.train_step())
        stats.append(compile_stats())  # this rank's
    trainer.close()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats)
    if dist.get_rank() == 0:
        torch.save({"rows": rows, "stats": gathered, "compiled": trainer.parts.compiled}, out / "result.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
