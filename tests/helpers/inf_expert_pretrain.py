"""train/pretrain.py with an Inf injected in one block's MoE experts, for the non-finite tracing test (never used in
production).

JETMOE_TEST_INF_BLOCK=b, JETMOE_TEST_INF_STEP=s: during optimizer step s (its replay included), the output of block
b's MoE output experts (mlp.output_linear) is multiplied by inf. The rank holding block b writes its rank to
<run dir>/inf_rank."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.parallel.pipeline import stage_blocks  # noqa: E402
from jetmoe.training import cli, trainer  # noqa: E402

BLOCK = int(os.environ["JETMOE_TEST_INF_BLOCK"])
AT_STEP = int(os.environ["JETMOE_TEST_INF_STEP"])
active = {"now": False}
real_setup, real_step = trainer.Trainer.setup, trainer.Trainer.train_step


def setup(self):
    real_setup(self)
    for block in stage_blocks(self.parts.module):
        if block.layer_idx == BLOCK:
            block.mlp.output_linear.register_forward_hook(
                lambda module, args, out: out * float("inf") if active["now"] else None)
            (self.run_dir / "inf_rank").write_text(str(self.rank))
    return self


def train_step(self):
    active["now"] = self.state.step + 1 == AT_STEP
    try:
        return real_step(self)
    finally:
        active["now"] = False


trainer.Trainer.setup, trainer.Trainer.train_step = setup, train_step

if __name__ == "__main__":
    cli.main()
