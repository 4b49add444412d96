"""What goes into a checkpoint folder and back out of it.

    config.json                         transformers' JetMoe config (the folder loads with from_pretrained)
    model.safetensors.index.json        transformers' index: global name -> file
    model-pp00.safetensors ...          fp32 weights, one file per pipeline stage (experts whole)
    optimizer/index.json                {"exp_avg": {name: file}, "exp_avg_sq": {...}}
    optimizer/exp_avg-pp00.safetensors  Adam moments keyed by the same global names
    rng/rank00000.safetensors           each rank's RNG states
    trainer_state.json                  step, optimizer step, lrs, scheduler, data position, layout, config
    manifest.json                       every file above with size and sha256 (written last)

Only data-parallel rank 0 of each stage writes weights and moments (after the collectives that
assemble them); rank 0 writes the JSON files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import rng
from jetmoe.model.hf_io import shard_by_bytes
from jetmoe.parallel.topology import Layout
from jetmoe.training.checkpoint.folders import CheckpointReader
from jetmoe.training.checkpoint.store import CheckpointWriter, tensor_index
from jetmoe.training.checkpoint.tensors import (
    OPTIMIZER_KEYS,
    access_for,
    entries,
    gather_whole,
    local_rows,
    optimizer_step,
    set_optimizer_step,
)

MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer/index.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"


@dataclass
class TrainingState:
    """The trainer's objects a checkpoint restores, besides model and optimizer. Any may be None."""

    step: int = 0
    scheduler: Any = None  # state_dict()/load_state_dict()
    loader: Any = None  # state_dict()/load_state_dict()
    config: dict | None = None  # the resolved run config (stored for the record)
    extra: dict = field(default_factory=dict)  # small JSON-able counters (e.g. the engine's)


def _name_fn(global_names: dict[str, str] | Callable | None) -> Callable[[str], str | None]:
    if global_names is None:
        return lambda n: n
    if callable(global_names):
        return global_names
    return global_names.get


SHARD_BYTES = 2 << 30  # bounds the writer's host memory: one shard gathered (and serialised) at a time


def _write_sharded(writer, stem: str, owned, access, key, is_writer: bool, shard_bytes: int, metadata=None) -> None:
    """Gather whole tensors in module order (collective) and write them as <stem>.safetensors,
    <stem>-part1.safetensors, ... each at most ~shard_bytes (one shard in host memory at a time)."""
    fp32_bytes = [(i, 4 * e.param.numel() * e.ep_size) for i, e in enumerate(owned)]
    for index, members in enumerate(shard_by_bytes(fp32_bytes, shard_bytes)):
        part = {}
        for i in members:
            whole = gather_whole(owned[i], access, key)
            if is_writer:
                part[owned[i].name] = whole.cpu()
        if is_writer and part:
            writer.write_tensors(f"{stem}{f'-part{index}' if index else ''}.safetensors", part, metadata)


def write(writer: CheckpointWriter, module: torch.nn.Module, optimizer, state: TrainingState, layout: Layout,
          model_config=None, global_names=None, shard_bytes: int = SHARD_BYTES, tokenizer=None) -> dict[str, Any]:
    """Every rank calls this (collectives inside). Returns the JSON files that rank 0 writes at
    commit (name -> object, or a function of all ranks' file records): pass them to writer.commit()."""
    access = access_for(optimizer)
    owned = [e for e in entries(module, _name_fn(global_names)) if not getattr(e.param, "ds_pipe_replicated", False)]
    is_writer = layout.dp_rank == 0
    tag = f"pp{layout.stage:02d}"

    _write_sharded(writer, f"model-{tag}", owned, access, None, is_writer, shard_bytes, {"format": "pt"})
    if optimizer is not None:
        for key in OPTIMIZER_KEYS:
            _write_sharded(writer, f"optimizer/{key}-{tag}", owned, access, key, is_writer, shard_bytes)
    tensors, meta = rng.capture()
    writer.write_tensors(f"rng/rank{layout.rank:05d}.safetensors", tensors, meta)

    opt_step = optimizer_step(access) if optimizer is not None else 0
    inner = access.inner() if optimizer is not None else None
    lrs = [g["lr"] for g in inner.param_groups] if inner is not None else []
    trainer_state = {
        "step": state.step,
        "optimizer_step": opt_step,
        "lrs": lrs,
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "data": state.loader.state_dict() if state.loader is not None else None,
        "extra": state.extra,
        "layout": layout.as_dict(),
        "config": state.config,
    }
    files = {
        MODEL_INDEX: lambda records: {
            "metadata": {"total_size": _total(records, "model-")},
            "weight_map": tensor_index(records, "model-"),
        },
        OPTIMIZER_INDEX: lambda records: {
            key: tensor_index(records, f"optimizer/{key}-") for key in (OPTIMIZER_KEYS if optimizer is not None else ())
        },
        TRAINER_STATE: _jsonable(trainer_state),
    }
    if model_config is not None:  # config.json, generation_config.json and the tokenizer: a transformers folder
        from jetmoe.training.checkpoint.hf_files import model_files

        files.update(model_files(model_config, tokenizer, torch.float32))
    return files


def _total(records, prefix: str) -> int:
    # safetensors header bytes are negligible next to the tensors; transformers only reads this for display
    return sum(r.size for r in records if r.name.startswith(prefix))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return obj.tolist()
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def save(root, step: int, module, optimizer, state: TrainingState, layout: Layout = Layout.SINGLE, *,
         model_config=None, global_names=None, keep: int = 0, comm=None, shard_bytes: int = SHARD_BYTES,
         tokenizer=None) -> Path:
    """Write and commit one checkpoint under `root`. Collective. Raises JetMoEError (on every rank) when
    any rank could not write; older checkpoints and `latest` are then untouched. With `model_config` the
    folder is a complete transformers directory (config, generation config, and the tokenizer if given)."""
    writer = CheckpointWriter(root, step, comm)
    files = write(writer, module, optimizer, state, layout, model_config, global_names, shard_bytes, tokenizer)
    return writer.commit(files, keep=keep)


def read_into(folder, module, optimizer, state: TrainingState, layout: Layout = Layout.SINGLE, *,
              global_names=None) -> dict:
    """Load a verified checkpoint folder into this rank's module / optimizer / scheduler / loader.
    Works for any (pp, dp, ep) of the saving run. Returns trainer_state.json."""
    reader = CheckpointReader(folder)
    trainer_state = reader.json(TRAINER_STATE)
    weight_map = reader.json(MODEL_INDEX)["weight_map"]
    optim_maps = reader.json(OPTIMIZER_INDEX) if reader.has(OPTIMIZER_INDEX) else {}
    access = access_for(optimizer)
    with_optimizer = optimizer is not None
    if with_optimizer:
        if set(optim_maps) != set(OPTIMIZER_KEYS):
            raise JetMoEError(f"{folder} holds no optimizer state; start from it with model.init_from={folder}")
        access.prepare_load()

    keys = OPTIMIZER_KEYS if with_optimizer else ()
    load_tensors(module, access, global_names, str(folder), keys,
                 shape=lambda key, name: reader.shape(optim_maps[key][name] if key else weight_map[name], name),
                 get=lambda key, name, rows: reader.tensor(optim_maps[key][name] if key else weight_map[name], name, rows),
                 has=lambda name: name in weight_map)

    if with_optimizer:
        set_optimizer_step(access, int(trainer_state["optimizer_step"]))
        _restore_lrs(access.inner(), trainer_state["lrs"])
        if state.scheduler is not None and trainer_state.get("scheduler") is not None:
            _load_scheduler(state.scheduler, trainer_state["scheduler"])
    if state.loader is not None and trainer_state.get("data") is not None:
        state.loader.load_state_dict(trainer_state["data"])
    rng_file = f"rng/rank{layout.rank:05d}.safetensors"
    if trainer_state["layout"].get("world") == layout.world and reader.has(rng_file):
        from safetensors import safe_open

        with safe_open(str(reader.folder / rng_file), framework="pt") as f:
            rng.restore({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    state.step = int(trainer_state["step"])
    reader.close()
    return trainer_state


def _restore_lrs(optimizer, lrs: list[float]) -> None:
    groups = optimizer.param_groups
    if not lrs:
        return
    if len(lrs) != len(groups):  # another layout split the parameters into other groups; lrs are uniform
        lrs = [lrs[0]] * len(groups)
    for g, lr in zip(groups, lrs):
        g["lr"] = lr


def _load_scheduler(scheduler, sd: dict) -> None:
    groups = len(getattr(scheduler, "base_lrs", []))
    for key in ("base_lrs", "_last_lr"):
        if isinstance(sd.get(key), list) and groups and len(sd[key]) != groups:
            sd[key] = [sd[key][0]] * groups
    scheduler.load_state_dict(sd)


def load_tensors(module, access, global_names, source: str, keys, shape, get, has) -> None:
    """Copy whole tensors (this rank's expert rows only) from a source into the module and optimizer.
    shape(key, name) / get(key, name, rows) with key None for the weight, else an optimizer key."""
    for e in entries(module, _name_fn(global_names)):
        if not has(e.name):
            raise JetMoEError(f"{source} has no weight {e.name}; the model config differs from the one it was saved with")
        whole = tuple(shape(None, e.name))
        expected = (e.param.shape[0] * e.ep_size, *e.param.shape[1:])
        if whole != expected:
            raise JetMoEError(f"{source}: {e.name} has shape {whole}, this model needs {expected}; "
                              "the model config differs from the one it was saved with")
        rows = local_rows(e, whole[0])
        access.set(e.param, None, get(None, e.name, rows))
        for key in keys:
            access.set(e.param, key, get(key, e.name, rows))


def read_weights_into(hf_dir, module, optimizer, *, global_names=None) -> None:
    """model.init_from: weights only, from a transformers JetMoe directory (any layout of this run)."""
    from safetensors import safe_open

    from jetmoe.model.hf_io import weight_files

    where = {n: str(p) for n, p in weight_files(Path(hf_dir)).items()}
    handles: dict[str, Any] = {}

    def sliced(name):
        if where[name] not in handles:
            handles[where[name]] = safe_open(where[name], framework="pt")
        return handles[where[name]].get_slice(name)

    def get(key, name, rows):
        s = sliced(name)
        t = s[rows.start:rows.stop] if rows is not None else s[:]
        return t.float()

    load_tensors(module, access_for(optimizer), global_names, str(hf_dir), (),
                 shape=lambda key, name: sliced(name).get_shape(), get=get, has=lambda name: name in where)
