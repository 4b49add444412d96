"""Bytes a real training step hands torch.distributed, counted by a spy (under torchrun):

    traffic_spy.py OUT_DIR STEPS RUN_DIR [overrides...]

Every collective and point-to-point function of torch.distributed is wrapped before any process group exists
(DeepSpeed's comm layer binds all_gather_into_tensor when it starts, and calls the rest through the module).
After one warm-up step (tensor shapes, buffers), STEPS steps are counted. Each call is classified by operation
and by its group's ranks (pipe-major, data-minor order: stage = rank // dp):
  send / recv -> pp,  all_to_all_single -> ep,  a group inside one stage -> dp,  the whole world across stages
  -> world,  another group across stages -> pp (the tied embedding's reduction, the loss broadcast); groups of
  one rank move nothing.
Control messages (integer tensors, or under 64 elements: losses, norms, flags, expert counts, shapes) are
counted apart. Bytes: an all-reduce's or broadcast's tensor, an all-gather's gathered buffer, a reduce-scatter's
input, what a send or an all-to-all sends (an all-to-all's own share included), what a recv receives.
Each rank writes OUT_DIR/rank<r>.json: {stage, pp, dp, ep, bytes: {category: {op: bytes per step}}}.
"""

import inspect
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

CONTROL_NUMEL = 64
BYTES_OF = {  # op -> the argument (or arguments) whose bytes count
    "all_reduce": "tensor", "broadcast": "tensor", "all_gather_into_tensor": "output_tensor",
    "all_gather": "tensor_list", "reduce_scatter_tensor": "input", "all_to_all_single": "input",
    "send": "tensor", "isend": "tensor", "recv": "tensor", "irecv": "tensor",
}
PEER = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src"}
events: dict[tuple, int] = {}  # (op, group ranks, control?) -> bytes
counting = False


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _spy(op: str, real):
    signature = inspect.signature(real)

    def call(*args, **kwargs):
        if counting:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            tensors = _tensors(bound.arguments[BYTES_OF[op]])
            if op in PEER:
                ranks = (dist.get_rank(), int(bound.arguments[PEER[op]]))
            else:
                ranks = tuple(dist.get_process_group_ranks(bound.arguments["group"] or dist.group.WORLD))
            control = any(not t.is_floating_point() or t.numel() < CONTROL_NUMEL for t in tensors)
            key = (op, ranks, control)
            events[key] = events.get(key, 0) + sum(t.numel() * t.element_size() for t in tensors)
        return real(*args, **kwargs)
    return call


for _op in BYTES_OF:
    setattr(dist, _op, _spy(_op, getattr(dist, _op)))

from trainer_setup import trainer_from_args  # noqa: E402  (after the spy: the trainer starts DeepSpeed's comm)

from jetmoe.parallel.process_group import close_process_group  # noqa: E402


def classify(op: str, ranks: tuple, control: bool, world: int, dp: int) -> str:
    if control:
        return "control"
    if op in PEER:
        return "pp"
    if op == "all_to_all_single":
        return "ep"
    if len({r // dp for r in ranks}) == 1:
        return "dp"
    return "world" if len(ranks) == world else "pp"


def main() -> None:
    global counting
    out, steps, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    trainer, _ = trainer_from_args(argv)
    try:
        trainer.train_step()  # warm-up: shapes sent once, buffers built
        counting = True
        for _ in range(steps):
            trainer.train_step()
        counting = False
        lay = trainer.layout
        counted: dict[str, dict[str, float]] = {}
        for (op, ranks, control), n in events.items():
            if len(ranks) < 2:
                continue
            category = classify(op, ranks, control, lay.world, lay.dp)
            ops = counted.setdefault(category, {})
            ops[op] = ops.get(op, 0) + n / steps
        out.mkdir(parents=True, exist_ok=True)
        record = {"stage": lay.stage, "pp": lay.pp, "dp": lay.dp, "ep": lay.ep, "bytes": counted}
        (out / f"rank{lay.rank}.json").write_text(json.dumps(record))
    finally:
        trainer.close()
    close_process_group()


if __name__ == "__main__":
    main()
