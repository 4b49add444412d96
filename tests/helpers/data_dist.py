"""Run under torchrun: every rank builds the same data with torch.distributed initialised (gloo), takes its
dp slice, and rank 0 checks that the gathered slices equal the single-process global batches."""

import json
import sys

import torch
import torch.distributed as dist

from jetmoe.data import DataConfig, build_data


def main(cfg_json: str, vocab: int, global_batch: int, micro_batch: int, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = build_data(DataConfig(**json.loads(cfg_json)), vocab, 512, seed=11)
    loader = data.train_loader(global_batch, micro_batch, rank, world)
    mine = torch.cat([torch.cat([mb["input_ids"] for mb in loader.next_step()]) for _ in range(steps)])
    gathered = [torch.empty_like(mine) for _ in range(world)] if rank == 0 else None
    dist.gather(mine, gathered, dst=0)
    built = torch.tensor([int(data.stats["built"])])
    dist.all_reduce(built)
    if rank == 0:
        reference = data.train_loader(global_batch, global_batch, 0, 1)
        per_step = [torch.cat([g.view(steps, -1, g.shape[-1])[s] for g in gathered]) for s in range(steps)]
        for s in range(steps):
            assert torch.equal(per_step[s], reference.next_step()[0]["input_ids"]), f"step {s} differs"
        print(json.dumps({"ok": True, "builders": int(built.item())}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
