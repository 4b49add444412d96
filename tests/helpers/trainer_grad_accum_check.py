"""One process, bf16: how exactly does the engine sum the micro-batches' gradients?

Runs one `Trainer.train_step` with many micro-batches, recording every parameter's gradient as each
micro-batch's backward produces it (bf16, already scaled by 1/micro-batches), and summing those in fp64:
the exact sum. The expert weights' gradients are added into the fp32 sum inside their matmul (no bf16 gradient
exists), so theirs is the fp64 sum of each micro-batch's product (output gradient)^T x (input rows), per expert. Inside the optimizer step it reads the gradient the engine accumulated
(deepspeed.utils.safe_get_full_grad) and prints one JSON line with the relative error of that sum.

    python tests/helpers/trainer_grad_accum_check.py RUN_DIR [overrides...]
"""

import json
import sys

import torch

from jetmoe.model import GroupedExperts
from trainer_setup import trainer_from_args


def main() -> None:
    from deepspeed.utils import safe_get_full_grad

    trainer, _ = trainer_from_args(sys.argv[1:])
    params = [p for p in trainer.parts.module.parameters() if p.requires_grad]
    exact = {id(p): torch.zeros(p.shape, dtype=torch.float64) for p in params}

    def record(p):
        def hook(grad):
            if grad is not None:  # None: a weight whose gradient went straight into its fp32 sum
                exact[id(p)].add_(grad.detach().double())  # returns None: the gradient itself is left alone
        return hook

    for p in params:
        p.register_hook(record(p))

    def record_product(weight):
        def forward_hook(module, args, output):
            rows, counts = args[0].detach().double(), args[1]
            counts = (counts if isinstance(counts, torch.Tensor) else counts.counts).tolist()

            def grad_hook(grad):
                start = 0
                for e, n in enumerate(counts):
                    exact[id(weight)][e] += grad[start:start + n].double().t() @ rows[start:start + n]
                    start += n
            output.register_hook(grad_hook)
        return forward_hook

    experts = [m for m in trainer.parts.module.modules() if isinstance(m, GroupedExperts)]
    for m in experts:
        m.register_forward_hook(record_product(m.weight))

    accumulated = {}
    outer = trainer.parts.optimizer  # the engine's ZeRO or BF16 optimizer, stepped with the summed gradient
    step = outer.step

    def capture_then_step(*args, **kwargs):
        for p in params:
            accumulated[id(p)] = safe_get_full_grad(p).double()
        return step(*args, **kwargs)

    outer.step = capture_then_step
    trainer.train_step()
    fused = sum(getattr(m.weight, "main_grad", None) is not None and m.weight.grad is None for m in experts)
    err = sum(float((accumulated[id(p)] - exact[id(p)]).square().sum()) for p in params) ** 0.5
    norm = sum(float(exact[id(p)].square().sum()) for p in params) ** 0.5
    print(json.dumps({"optimizer": type(trainer.parts.optimizer).__name__,
                      "grad_accum_dtype": trainer.parts.ds_config.get("data_types", {}).get("grad_accum_dtype"),
                      "micro_batches": trainer.parts.grad_accumulation, "rel_error": err / norm,
                      "expert_weights": len(experts), "expert_weights_fused": fused}))
    trainer.close()


if __name__ == "__main__":
    main()
