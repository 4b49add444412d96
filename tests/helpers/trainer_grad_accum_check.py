"""One process, bf16: how exactly does the engine sum the micro-batches' gradients?

Runs one `Trainer.train_step` with many micro-batches, recording every parameter's gradient as each
micro-batch's backward produces it (bf16, already scaled by 1/micro-batches), and summing those in fp64:
the exact sum. Inside the optimizer step it reads the gradient the engine accumulated
(deepspeed.utils.safe_get_full_grad) and prints one JSON line with the relative error of that sum.

    python tests/helpers/trainer_grad_accum_check.py RUN_DIR [overrides...]
"""

import json
import sys

import torch

from trainer_setup import trainer_from_args


def main() -> None:
    from deepspeed.utils import safe_get_full_grad

    trainer, _ = trainer_from_args(sys.argv[1:])
    params = [p for p in trainer.parts.module.parameters() if p.requires_grad]
    exact = {id(p): torch.zeros(p.shape, dtype=torch.float64) for p in params}

    def record(p):
        def hook(grad):
            exact[id(p)].add_(grad.detach().double())  # returns None: the gradient itself is left alone
        return hook

    for p in params:
        p.register_hook(record(p))

    accumulated = {}
    outer = trainer.parts.optimizer  # the engine's ZeRO or BF16 optimizer, stepped with the summed gradient
    step = outer.step

    def capture_then_step(*args, **kwargs):
        for p in params:
            accumulated[id(p)] = safe_get_full_grad(p).double()
        return step(*args, **kwargs)

    outer.step = capture_then_step
    trainer.train_step()
    err = sum(float((accumulated[id(p)] - exact[id(p)]).square().sum()) for p in params) ** 0.5
    norm = sum(float(exact[id(p)].square().sum()) for p in params) ** 0.5
    print(json.dumps({"optimizer": type(trainer.parts.optimizer).__name__,
                      "grad_accum_dtype": trainer.parts.ds_config.get("data_types", {}).get("grad_accum_dtype"),
                      "micro_batches": trainer.parts.grad_accumulation, "rel_error": err / norm}))
    trainer.close()


if __name__ == "__main__":
    main()
