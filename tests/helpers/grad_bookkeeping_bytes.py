"""One process, bf16: bytes the engine moves per micro-batch per parameter to keep gradients, outside the model's
own forward and backward (zeroing, accumulating into .grad, casts, adding into the fp32 sum; for the expert
weights, whose backward matmul adds into the fp32 sum itself, that sum read and written).

Counts, with a dispatch mode over one `Trainer.train_step`, every op that reads or writes a parameter's `.grad`
or the optimizer's fp32 gradient buffers (bytes of its tensor inputs plus outputs; write-only ops count their
output once), except inside the optimizer step. Prints one JSON line:
{bytes_per_param_per_micro_batch, by_op, micro_batches, params, expert_params, immediate_grad_update}.

    python tests/helpers/grad_bookkeeping_bytes.py RUN_DIR [overrides...]
"""

import json
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from trainer_setup import trainer_from_args

WRITE_ONLY = {"aten.zero_.default", "aten.fill_.Scalar", "aten._foreach_zero_.default"}
# The expert weights' backward matmuls adding into the fp32 sum (C += A @ B): their operands are the model's own
# backward reads; what keeping the gradient costs is C, read and written. The forward op only carries C along.
ACCUMULATING_MATMULS = {"jetmoe.grouped_mm_backward_into_main_grad.default": 4}  # op -> the argument that is C
CARRIES_ONLY = {"jetmoe.grouped_mm_into_main_grad.default"}


def moved_bytes(func, inputs, outputs) -> int:
    """Bytes read and written: a write-only op writes its first argument(s); an in-place op reads its inputs
    and writes the first; any other op reads its inputs and writes its outputs."""
    name = str(func)
    if name in WRITE_ONLY:
        return sum(t.nbytes for t in inputs)
    if name in ACCUMULATING_MATMULS:
        return 2 * inputs[ACCUMULATING_MATMULS[name]].nbytes
    if name in CARRIES_ONLY:
        return 0
    if func._schema.name.endswith("_"):
        return sum(t.nbytes for t in inputs) + inputs[0].nbytes
    return sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)


class GradientTraffic(TorchDispatchMode):
    def __init__(self, params, fp32_buffers):
        super().__init__()
        self.params, self.fixed = params, {t.untyped_storage().data_ptr() for t in fp32_buffers}
        self.bytes, self.on = Counter(), True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            watched = self.fixed | {p.grad.untyped_storage().data_ptr() for p in self.params if p.grad is not None}
            inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            if not func.is_view and any(t.untyped_storage().data_ptr() in watched for t in inputs + outputs):
                self.bytes[str(func)] += moved_bytes(func, inputs, outputs)
        return out


def main() -> None:
    trainer, _ = trainer_from_args(sys.argv[1:])
    params = [p for p in trainer.parts.module.parameters() if p.requires_grad]
    optimizer = trainer.parts.optimizer
    mode = GradientTraffic(params, [g for groups in optimizer.fp32_groups_gradients for g in groups])
    step = optimizer.step

    def step_uncounted(*args, **kwargs):
        mode.on = False
        try:
            return step(*args, **kwargs)
        finally:
            mode.on = True

    optimizer.step = step_uncounted
    trainer.train_step()  # warm-up: buffers and optimizer state exist
    mode.bytes.clear()
    with mode:
        trainer.train_step()
    n, m = sum(p.numel() for p in params), trainer.parts.grad_accumulation
    print(json.dumps({"bytes_per_param_per_micro_batch": sum(mode.bytes.values()) / n / m,
                      "by_op": {k: v / n / m for k, v in mode.bytes.most_common()}, "micro_batches": m, "params": n,
                      "expert_params": sum(p.numel() for p in params if getattr(p, "main_grad", None) is not None),
                      "immediate_grad_update": bool(optimizer.immediate_grad_update)}))
    trainer.close()


if __name__ == "__main__":
    main()
