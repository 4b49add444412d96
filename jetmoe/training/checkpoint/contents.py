"""What goes into a checkpoint folder and back out of it.

    config.json                            transformers' JetMoe config (the folder loads with from_pretrained)
    model.safetensors.index.json           transformers' index: global name -> file
    model-pp00[-dp01][-part1].safetensors  fp32 weights, whole tensors (experts whole); a stage's tensors
                                           are spread over its dp ranks (-dpNN only when dp > 1)
    optimizer/index.json                   {"exp_avg": {name: {"shape": [...], "parts": [[file, start, numel]]}}}
    optimizer/exp_avg-pp00[-dp01].safetensors  the Adam moments this rank's ZeRO-1 partition holds: flat
                                           fragments keyed by global name, elements [start, start+numel)
                                           of the flattened whole tensor (expert rows offset by ep rank)
    rng/rank00000.safetensors              each rank's RNG states
    trainer_state.json                     step, optimizer step, lrs, scheduler, data position, layout, config
    manifest.json                          every file above with size and sha256 (written last)

Every rank writes its own part (no gather of optimizer state; weights gathered only for experts over ep,
or from the ZeRO masters when the working copy is not fp32); rank 0 writes the JSON files. Any rank of
any later layout reads back only the ranges it holds (parts.PartReader).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import rng
from jetmoe.parallel.topology import Layout
from jetmoe.training.checkpoint.parts import PartReader
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
    bytes_read: int = 0  # set by read_into: bytes this rank read from the checkpoint


def _name_fn(global_names: dict[str, str] | Callable | None) -> Callable[[str], str | None]:
    if global_names is None:
        return lambda n: n
    if callable(global_names):
        return global_names
    return global_names.get


SHARD_BYTES = 2 << 30  # bounds the writer's host memory on a synchronous save: one shard at a time


def _assign(owned, dp: int) -> list[int]:
    """dp rank that writes each whole weight: largest first onto the least loaded rank (the same on every
    rank). Optimizer state needs no plan: ZeRO-1 partitions are already balanced and written where held."""
    load, owner = [0] * dp, [0] * len(owned)
    for i in sorted(range(len(owned)), key=lambda i: (-owned[i].param.numel() * owned[i].ep_size, i)):
        rank = min(range(dp), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += owned[i].param.numel() * owned[i].ep_size
    return owner


def _host(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """A host tensor that training cannot change underneath a background writer."""
    t = t.detach()
    if t.is_cuda:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)  # the caller synchronises once for all copies
    return t.clone() if copy else t


def _whole_weight(entry, access, mine: bool):
    """The whole fp32 weight on its writer. fp32 working copies equal ZeRO's masters after a step, so no
    collective is needed for them; other dtypes read the masters (a collective over dp); experts gather
    their rows over the ep group (collective). Every rank of the stage calls this for every entry."""
    if entry.ep_group is None and entry.param.dtype == torch.float32:
        return entry.param if mine else None
    whole = gather_whole(entry, access, None)
    return whole if mine else None


def _sharded(items, stem: str, shard_bytes: int):
    """(name, tensor, part-or-None) -> jobs (file, tensors, metadata, parts), files of at most ~shard_bytes."""
    index, size, tensors, parts = 0, 0, {}, {}
    for name, t, part in items:
        if tensors and size + 4 * t.numel() > shard_bytes:
            yield f"{stem}{f'-part{index}' if index else ''}.safetensors", tensors, None, parts
            index, size, tensors, parts = index + 1, 0, {}, {}
        tensors[name] = t
        size += 4 * t.numel()
        if part is not None:
            parts[name] = part
    if tensors:
        yield f"{stem}{f'-part{index}' if index else ''}.safetensors", tensors, None, parts


def jobs(module, optimizer, layout: Layout, global_names=None, shard_bytes: int = SHARD_BYTES, copy: bool = False):
    """This rank's files as (name, tensors, metadata, parts), tensors on the host. Every rank of a stage
    iterates it to the end (collectives inside). Weights: whole tensors, spread over the stage's dp ranks;
    optimizer state: this rank's own ZeRO-1 fragments, flat, with their place in the whole tensor."""
    access = access_for(optimizer)
    owned = [e for e in entries(module, _name_fn(global_names)) if not getattr(e.param, "ds_pipe_replicated", False)]
    owner = _assign(owned, layout.dp)
    tag = f"pp{layout.stage:02d}" + (f"-dp{layout.dp_rank:02d}" if layout.dp > 1 else "")

    def weights():
        for e, rank in zip(owned, owner):
            whole = _whole_weight(e, access, rank == layout.dp_rank)
            if whole is not None:
                yield e.name, _host(whole, copy), None

    for name, tensors, _, parts in _sharded(weights(), f"model-{tag}", shard_bytes):
        yield name, tensors, {"format": "pt"}, None
    if optimizer is not None:
        for key in OPTIMIZER_KEYS:
            def fragments(key=key):
                for e in owned:
                    frag = access.fragment(e.param, primary=layout.dp_rank == 0)
                    if frag is None or frag[1] == 0:
                        continue
                    start = e.ep_rank * e.param.numel() + frag[0]
                    shape = [e.param.shape[0] * e.ep_size, *e.param.shape[1:]]
                    yield e.name, _host(access.get_fragment(e.param, key), copy), [start, frag[1], shape]

            yield from _sharded(fragments(), f"optimizer/{key}-{tag}", shard_bytes)
    tensors, meta = rng.capture()
    yield f"rng/rank{layout.rank:05d}.safetensors", tensors, meta, None


def _optimizer_index(records, with_optimizer: bool) -> dict:
    out = {key: {} for key in (OPTIMIZER_KEYS if with_optimizer else ())}
    for r in records:
        for key in out:
            if r.name.startswith(f"optimizer/{key}-"):
                for name, (start, numel, shape) in r.parts.items():
                    slot = out[key].setdefault(name, {"shape": shape, "parts": []})
                    slot["parts"].append([r.name, start, numel])
    for per_key in out.values():
        for slot in per_key.values():
            slot["parts"].sort(key=lambda p: p[1])
    return out


def write(writer: CheckpointWriter, module: torch.nn.Module, optimizer, state: TrainingState, layout: Layout,
          model_config=None, global_names=None, shard_bytes: int = SHARD_BYTES, tokenizer=None,
          background: bool = False) -> dict[str, Any]:
    """Every rank calls this (collectives inside). Returns the JSON files that rank 0 writes at
    commit (name -> object, or a function of all ranks' file records): pass them to writer.commit().
    background: copy the tensors to host buffers now and write them in a thread (commit waits for it)."""
    if background:
        todo = list(jobs(module, optimizer, layout, global_names, shard_bytes, copy=True))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned copies are complete before training touches the tensors
        writer.write_in_background(todo)
    else:
        for job in jobs(module, optimizer, layout, global_names, shard_bytes):
            writer.write_tensors(*job)

    access = access_for(optimizer)
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
        OPTIMIZER_INDEX: lambda records: _optimizer_index(records, optimizer is not None),
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
         model_config=None, global_names=None, keep: int = 0, keep_every: int = 0, comm=None,
         shard_bytes: int = SHARD_BYTES, tokenizer=None) -> Path:
    """Write and commit one checkpoint under `root`. Collective. Raises JetMoEError (on every rank) when
    any rank could not write; older checkpoints and `latest` are then untouched. With `model_config` the
    folder is a complete transformers directory (config, generation config, and the tokenizer if given)."""
    writer = CheckpointWriter(root, step, comm)
    files = write(writer, module, optimizer, state, layout, model_config, global_names, shard_bytes, tokenizer)
    return writer.commit(files, keep=keep, keep_every=keep_every)


def read_into(folder, module, optimizer, state: TrainingState, layout: Layout = Layout.SINGLE, *,
              global_names=None, verify: str = "full", finish: bool = True) -> dict:
    """Load a committed checkpoint folder into this rank's module / optimizer / scheduler / loader, reading
    only what this rank holds (its stage's weights, its expert rows, its ZeRO-1 fragments) and verifying
    each file it reads (see parts.PartReader). Works for any (pp, dp, ep) of the saving run; no collective
    until finish_load. Returns trainer_state.json; state.bytes_read counts the bytes read. finish=False: the caller calls
    finish_load(optimizer) (a collective) once every rank has read without error."""
    reader = PartReader(folder, verify)
    try:
        trainer_state = _read(reader, folder, module, optimizer, state, layout, global_names)
    finally:
        state.bytes_read = reader.bytes_read
        reader.close()
    if finish:
        finish_load(optimizer)
    return trainer_state


def finish_load(optimizer) -> None:
    """After read_into on every rank (collective): rebuild working weights from the loaded fp32 partitions."""
    access_for(optimizer).finish_load()


def _read(reader, folder, module, optimizer, state, layout, global_names) -> dict:
    trainer_state = reader.json(TRAINER_STATE)
    weight_map = reader.json(MODEL_INDEX)["weight_map"]
    optim_index = reader.json(OPTIMIZER_INDEX) if reader.has(OPTIMIZER_INDEX) else {}
    access = access_for(optimizer)
    with_optimizer = optimizer is not None
    if with_optimizer:
        if set(optim_index) != set(OPTIMIZER_KEYS) or not all(optim_index.values()):
            raise JetMoEError(f"{folder} holds no optimizer state; start from it with model.init_from={folder}")
        access.prepare_load()

    for e in entries(module, _name_fn(global_names)):
        if e.name not in weight_map:
            raise JetMoEError(f"{folder} has no weight {e.name}; the model config differs from the one it was saved with")
        file = weight_map[e.name]
        whole = tuple(reader.shape(file, e.name))
        expected = (e.param.shape[0] * e.ep_size, *e.param.shape[1:])
        if whole != expected:
            raise JetMoEError(f"{folder}: {e.name} has shape {whole}, this model needs {expected}; "
                              "the model config differs from the one it was saved with")
        lo = e.ep_rank * e.param.numel()  # this rank's expert rows are one flat range of the whole tensor
        frag = access.fragment(e.param, primary=True)
        if access.partitioned:  # only this rank's ZeRO partition of the fp32 master; finish_load does the rest
            if frag is not None and frag[1]:
                access.set_fragment(e.param, None, reader.tensor(file, e.name, lo + frag[0], lo + frag[0] + frag[1]))
        elif e.ep_group is None:
            access.set(e.param, None, reader.tensor(file, e.name))
        else:
            access.set(e.param, None, reader.tensor(file, e.name, lo, lo + e.param.numel()).reshape(e.param.shape))
        if not with_optimizer:
            continue
        if frag is None or frag[1] == 0:
            continue
        for key in OPTIMIZER_KEYS:
            slot = optim_index[key].get(e.name)
            if slot is None:
                raise JetMoEError(f"{folder} has no {key} for {e.name}; the checkpoint is damaged")
            if isinstance(slot, str):  # format version 1: whole tensors, one file each
                slot = {"parts": [[slot, 0, int(torch.Size(reader.shape(slot, e.name)).numel())]]}
            start = lo + frag[0]
            access.set_fragment(e.param, key, reader.flat(slot["parts"], e.name, start, start + frag[1]))

    if with_optimizer:
        set_optimizer_step(access, int(trainer_state["optimizer_step"]))
        _restore_lrs(access.inner(), trainer_state["lrs"])
        if state.scheduler is not None and trainer_state.get("scheduler") is not None:
            _load_scheduler(state.scheduler, trainer_state["scheduler"])
    if state.loader is not None and trainer_state.get("data") is not None:
        state.loader.load_state_dict(trainer_state["data"])
    rng_file = f"rng/rank{layout.rank:05d}.safetensors"
    if trainer_state["layout"].get("world") == layout.world and reader.has(rng_file):
        _, header = reader._header(rng_file)
        rng.restore({k: reader.tensor(rng_file, k) for k in header if k != "__metadata__"},
                    header.get("__metadata__") or {})
    state.step = int(trainer_state["step"])
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
