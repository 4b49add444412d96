"""train/pretrain.py with poisoned global batches, for the loss-spike tests (never used in production).

JETMOE_TEST_POISON="p1,p2": the global batches that start at these stream positions (samples consumed) have their
LM loss multiplied by 50 on the last stage: a spike tied to the data, not to the step. Every rank also writes the
sha256 of its stage's parameters after each step to <run dir>/param_hashes_rank<r>.jsonl ({"step", "sha256"})."""

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jetmoe.parallel import pipeline  # noqa: E402
from jetmoe.training import cli, trainer  # noqa: E402

POISON = {int(p) for p in os.environ.get("JETMOE_TEST_POISON", "").split(",") if p}
poisoned = {"now": False}
real_loss = pipeline.head_loss


def head_loss(outputs, labels):
    loss = real_loss(outputs, labels)
    return loss * 50 if poisoned["now"] else loss


pipeline.head_loss = head_loss  # build_pipeline looks it up when it builds the stage
real_setup, real_step = trainer.Trainer.setup, trainer.Trainer.train_step


def setup(self):
    real_setup(self)
    real_next = self.loader.next_step

    def next_step():
        poisoned["now"] = self.loader.consumed_samples in POISON
        return real_next()

    self.loader.next_step = next_step
    return self


def train_step(self):
    row = real_step(self)
    digest = hashlib.sha256()
    for _, p in sorted(self.parts.module.named_parameters()):
        digest.update(p.detach().cpu().numpy().tobytes())
    with open(self.run_dir / f"param_hashes_rank{self.rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": self.state.step, "sha256": digest.hexdigest()}) + "\n")
    return row


trainer.Trainer.setup, trainer.Trainer.train_step = setup, train_step

if __name__ == "__main__":
    cli.main()
