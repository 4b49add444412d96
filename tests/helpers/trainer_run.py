"""Run the trainer in a test (any launcher), then dump what parity tests compare.

    python tests/helpers/trainer_run.py OUT_DIR [overrides...]

Writes OUT_DIR/rows.json (rank 0: the metrics rows) and OUT_DIR/params_rank<r>.pt (each stage's
dp-rank-0 process: {transformers name: tensor} after the last step).
"""

import json
import sys
from pathlib import Path

import torch

from jetmoe.training.cli import strip_local_rank
from jetmoe.training.compose import load
from jetmoe.training.trainer import Trainer


def main() -> None:
    args = strip_local_rank(sys.argv[1:])
    out, overrides = Path(args[0]), args[1:]
    trainer = Trainer(load(overrides), out / "run").setup()
    try:
        rows = trainer.train()
    finally:
        trainer.close()
    out.mkdir(parents=True, exist_ok=True)
    if trainer.rank == 0:
        (out / "rows.json").write_text(json.dumps(rows))
    if trainer.layout.dp_rank == 0:
        names = trainer.parts.global_names
        params = {names[n]: p.detach().float().cpu().clone() for n, p in trainer.parts.module.named_parameters()}
        torch.save(params, out / f"params_rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()
