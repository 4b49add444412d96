"""torchrun entry for the expert-parallel end-to-end tests: train through jetmoe.training's Trainer,
then every rank saves its metrics rows and its parameters under transformers' names, expert weights
gathered over the ep group to all E experts.

usage: torchrun ... tests/helpers/expert_e2e.py OUT_DIR [hydra overrides]
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out_dir: str, overrides: list[str]) -> None:
    from trainer_setup import trainer_from_args

    out = Path(out_dir)
    trainer, cfg = trainer_from_args([str(out / "run"), *overrides])
    rows = trainer.train()
    trainer.close()

    ep = cfg.parallel.ep
    ep_group = None
    if ep > 1:
        from jetmoe.parallel.deepspeed_internals import expert_parallel_group
        from jetmoe.parallel.expert import expert_group_name

        ep_group = expert_parallel_group(expert_group_name(ep))
    module = trainer.parts.module
    params, sliced = [], 0
    for local, p in module.named_parameters():
        t = p.detach().clone()
        if getattr(p, "allreduce", True) is False:
            parts = [torch.empty_like(t) for _ in range(ep)]
            dist.all_gather(parts, t, group=ep_group)
            t = torch.cat(parts)
            sliced += 1
        params.append((module.global_names[local], t))
    rank = dist.get_rank()
    torch.save({"rows": rows, "params": params, "sliced": sliced, "has_moe": trainer.engine.has_moe_layers},
               out / f"rank{rank}.pt")
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
