#!/usr/bin/env python
"""Checkpoint write/read benchmark on a ~150M-parameter config (12 layers, hidden 768) at pp=3 x dp=2 (CPU, gloo).

    torchrun --nproc_per_node 6 bench/checkpoint.py [Hydra overrides]

After one training step (so Adam state exists) it saves the same state four ways and reads it back:
- the previous writer (dp rank 0 of each stage gathers every weight and moment, then writes alone),
  re-created here from the same gather helpers, as the reference;
- the current writer, synchronously (`save_sync_s`), and asynchronously (`save_blocking_s`: what the loop
  waits for, the host copy; `save_async_total_s`: until committed);
- a resume into the same layout: `load_s` and the bytes each rank read (counted in the reader) against its
  share (checkpoint bytes / ranks).
The last line is one JSON object. Timings on an oversubscribed CPU are indicative; byte ratios are exact.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = ["model.hidden_size=768", "model.num_hidden_layers=12", "model.intermediate_size=1024",
          "model.kv_channels=96", "model.num_key_value_heads=4", "parallel.partition=parameters",
          "data.seq_len=32", "train.micro_batch_size=1", "train.global_batch_size=2", "train.max_steps=1",
          "train.eval_every=0", "logging.wandb.mode=disabled", "logging.progress_bar=false",
          "logging.console=false", "logging.router_every=0", "checkpoint.every=0"]


def gather_whole(entry, access, key):
    """The whole fp32 tensor (all experts) on every rank of the entry's groups, as the previous writer
    gathered it (DeepSpeed's safe_get_full_* over dp, then the expert rows over ep). Collective."""
    local = access.get(entry.param, key).contiguous()
    if entry.ep_group is None:
        return local
    parts = [torch.empty_like(local) for _ in range(entry.ep_size)]
    dist.all_gather(parts, local, group=entry.ep_group)
    return torch.cat(parts, dim=0)


def previous_writer(writer, module, optimizer, layout, global_names):
    """What the writer did before: gather whole tensors (weights and moments) to dp rank 0, which writes."""
    from jetmoe.training.checkpoint.rank_files import name_fn
    from jetmoe.training.checkpoint.tensors import OPTIMIZER_KEYS, access_for, entries

    access = access_for(optimizer)
    owned = [e for e in entries(module, name_fn(global_names)) if not getattr(e.param, "ds_pipe_replicated", False)]
    for key, stem in ((None, "model"), *((k, f"optimizer/{k}") for k in OPTIMIZER_KEYS)):
        part = {e.name: gather_whole(e, access, key).cpu() for e in owned}
        if layout.dp_rank == 0:
            writer.write_tensors(f"{stem}-pp{layout.stage:02d}.safetensors", part)


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    dist.barrier()
    return out, time.perf_counter() - start


def main(argv: list[str]) -> None:
    from jetmoe.parallel.process_group import close_process_group
    from jetmoe.training.checkpoint import contents, store
    from jetmoe.training.compose import load
    from jetmoe.training.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = load([f"parallel.pp={min(3, world)}", *CONFIG, *argv])
    trainer = Trainer(config, Path(tempfile.gettempdir()) / f"jetmoe_bench_checkpoint_{world}").setup()
    trainer.train_step()
    module, optimizer, layout, names = trainer.parts.module, trainer.parts.optimizer, trainer.layout, trainer.parts.global_names
    manager = trainer.checkpoint
    root = Path(manager.comm.broadcast(tempfile.mkdtemp(prefix="jetmoe_ckpt_bench_")))
    from jetmoe.plan.params import ModelShape, count_params

    params = count_params(ModelShape.from_config(config.model)).total

    def writer_for(step):
        return store.CheckpointWriter(root, step, manager.comm, manager.launch)

    def spread(value):
        return manager.comm.gather(value)

    old = writer_for(1)
    _, old_s = timed(lambda: (previous_writer(old, module, optimizer, layout, names), old.commit({})))
    old_written = spread(old.bytes_written)

    def new_save(step, background):
        w = writer_for(step)
        files = contents.write(w, module, optimizer, manager._contents_state(step), layout,
                               model_config=trainer.model_config, global_names=names, background=background)
        return w, files

    (sync, files), sync_s = timed(lambda: new_save(2, False))
    _, commit_s = timed(lambda: sync.commit(files))
    written = spread(sync.bytes_written)
    (bg, bg_files), blocking_s = timed(lambda: new_save(3, True))
    folder, async_rest_s = timed(lambda: bg.commit(bg_files))

    state = manager._contents_state(0)
    _, load_s = timed(lambda: (contents.read_into(folder, module, optimizer, state, layout, global_names=names,
                                                  finish=False), contents.finish_load(optimizer)))
    read = spread(state.bytes_read)
    if manager.comm.rank == 0:
        from jetmoe.training.checkpoint.folders import load_manifest

        total = sum(m["size"] for m in load_manifest(folder)["files"].values())
        old_total = sum(m["size"] for m in load_manifest(root / "step_00000001")["files"].values())
        mean = sum(written) / len(written)
        print(json.dumps({
            "params": params,
            "ranks": world,
            "checkpoint_bytes": total,
            "bytes_written_max_over_mean": round(max(written) / mean, 3),
            "save_blocking_s": round(blocking_s, 3),
            "save_sync_s": round(sync_s + commit_s, 3),
            "save_async_total_s": round(blocking_s + async_rest_s, 3),
            "resume_bytes_read_max_over_share": round(max(read) / (total / world), 3),
            "load_s": round(load_s, 3),
            "previous_writer_s": round(old_s, 3),
            "previous_writer_bytes_max_over_mean": round(max(old_written) / (sum(old_written) / len(old_written)), 3),
            "previous_checkpoint_bytes": old_total,
        }), flush=True)
    dist.barrier()
    if manager.comm.rank == 0:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    trainer.close()
    close_process_group()  # every group, the gloo twins included, before interpreter exit


if __name__ == "__main__":
    main(sys.argv[1:])
