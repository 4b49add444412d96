"""What goes into a checkpoint folder and back out of it.

    config.json                            transformers' JetMoe config (the folder loads with from_pretrained)
    model.safetensors.index.json           transformers' index: global name -> file
    model-pp00[-dp01][-part1].safetensors  weights in the working dtype, whole tensors (experts whole); a
                                           stage's tensors are spread over its dp ranks (-dpNN when dp > 1)
    optimizer/index.json                   {"exp_avg": {name: {"shape": [...], "parts": [[file, start, numel]]}}}
    optimizer/exp_avg-pp00[-dp01].safetensors  the Adam moments this rank's ZeRO-1 partition holds: flat
                                           fragments keyed by global name, elements [start, start+numel)
                                           of the flattened whole tensor (expert rows offset by ep rank)
    optimizer/master-pp00[-dp01].safetensors   bf16 runs only: the fp32 master fragments, laid out the same
    rng/rank00000.safetensors              each rank's RNG states
    trainer_state.json                     step, optimizer step, lrs, every named state (scheduler, data position,
                                           counters), layout, config
    manifest.json                          every file above with size and sha256 (written last)

Every rank writes its own part (rank_files.py; no collective over dp), rank 0 the JSON files. Any rank of
any later layout reads back only the ranges it holds (parts.PartReader). A weight's fp32 value comes from
the master fragments when the checkpoint has them, else from the weight file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from jetmoe.errors import JetMoEError, ResumeMismatch
from jetmoe.training.checkpoint import rng
from jetmoe.parallel.topology import Layout
from jetmoe.training.checkpoint.parts import PartReader
from jetmoe.training.checkpoint.rank_files import (
    MASTER,
    SHARD_BYTES,
    jobs,
    name_fn,
    optimizer_index,
    stores_masters,
    weight_dtype,
)
from jetmoe.training.checkpoint.store import CheckpointWriter, tensor_index
from jetmoe.training.checkpoint.tensors import (
    OPTIMIZER_KEYS,
    access_for,
    entries,
    local_rows,
    optimizer_step,
    set_optimizer_step,
)

MODEL_INDEX = "model.safetensors.index.json"
OPTIMIZER_INDEX = "optimizer/index.json"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.json"


class Stateful(Protocol):
    """What a checkpoint saves and restores by name (torchtitan's Stateful): a JSON-able state."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# trainer_state.json's own keys: a named state may not take them.
RESERVED = ("step", "optimizer_step", "lrs", "extra", "layout", "config")
# Checkpoints written before the registry kept these states' counters flat in `extra` (with `step` beside it).
FLAT_IN_EXTRA = ("trainer", "engine")


class SchedulerState:
    """An LR scheduler as a named state that loads into another layout's parameter groups (lrs are uniform)."""

    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        groups = len(getattr(self.scheduler, "base_lrs", []))
        for key in ("base_lrs", "_last_lr"):
            if isinstance(state.get(key), list) and groups and len(state[key]) != groups:
                state[key] = [state[key][0]] * groups
        self.scheduler.load_state_dict(state)


@dataclass
class TrainingState:
    """What a checkpoint restores besides model and optimizer: a registry of named states, each stored under its
    name in trainer_state.json and loaded back into the same object (e.g. "scheduler", "data" for the loader's
    position, "trainer" and "engine" for the step counters); an LR scheduler is wrapped in SchedulerState."""

    step: int = 0
    states: dict[str, Stateful] = field(default_factory=dict)
    config: dict | None = None  # the resolved run config (stored for the record)
    extra: dict = field(default_factory=dict)  # small JSON-able facts for the record (e.g. the data fingerprint)
    bytes_read: int = 0  # set by read_into: bytes this rank read from the checkpoint

    def __post_init__(self) -> None:
        taken = sorted(set(self.states) & set(RESERVED))
        if taken:
            raise ValueError(f"checkpoint state names {taken} are trainer_state.json's own keys")
        self.states = {name: SchedulerState(obj) if isinstance(obj, torch.optim.lr_scheduler.LRScheduler) else obj
                       for name, obj in self.states.items()}


def write(writer: CheckpointWriter, module: torch.nn.Module, optimizer, state: TrainingState, layout: Layout,
          model_config=None, global_names=None, shard_bytes: int = SHARD_BYTES, tokenizer=None,
          background: bool = False) -> dict[str, Any]:
    """Every rank calls this (collectives inside). Returns the JSON files that rank 0 writes at
    commit (name -> object, or a function of all ranks' file records): pass them to writer.commit().
    background: copy the tensors to host buffers now and write them in a thread (commit waits for it)."""
    if background:
        gathers = []
        todo = list(jobs(module, optimizer, layout, global_names, shard_bytes, copy=True, gathers=gathers))
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()  # the pinned copies are complete before training touches the tensors
        writer.write_in_background(todo, first=lambda: [g.gather() for g in gathers])
    else:
        for job in jobs(module, optimizer, layout, global_names, shard_bytes):
            writer.write_tensors(*job)

    keys = () if optimizer is None else (*OPTIMIZER_KEYS, *((MASTER,) if stores_masters(module, optimizer) else ()))
    access = access_for(optimizer)
    opt_step = optimizer_step(access) if optimizer is not None else 0
    inner = access.inner() if optimizer is not None else None
    lrs = [g["lr"] for g in inner.param_groups] if inner is not None else []
    trainer_state = {
        "step": state.step,
        "optimizer_step": opt_step,
        "lrs": lrs,
        **{name: obj.state_dict() for name, obj in state.states.items()},
        "extra": state.extra,
        "layout": layout.as_dict(),
        "config": state.config,
    }
    files = {
        MODEL_INDEX: lambda records: {
            "metadata": {"total_size": _total(records, "model-")},
            "weight_map": tensor_index(records, "model-"),
        },
        OPTIMIZER_INDEX: lambda records: optimizer_index(records, keys),
        TRAINER_STATE: _jsonable(trainer_state),
    }
    if model_config is not None:  # config.json, generation_config.json and the tokenizer: a transformers folder
        from jetmoe.training.checkpoint.hf_files import model_files

        files.update(model_files(model_config, tokenizer, weight_dtype(module)))
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
              global_names=None, verify: str = "full", finish: bool = True, check=None) -> dict:
    """Load a committed checkpoint folder into this rank's module / optimizer / scheduler / loader, reading
    only what this rank holds (its stage's weights, its expert rows, its ZeRO-1 fragments) and verifying
    each file it reads (see parts.PartReader). Works for any (pp, dp, ep) of the saving run; no collective
    until finish_load. Returns trainer_state.json; state.bytes_read counts the bytes read. finish=False: the caller calls
    finish_load(optimizer) (a collective) once every rank has read without error. check: called with
    trainer_state.json (verified) before any tensor is read; it may refuse (raise) or drop named states."""
    reader = PartReader(folder, verify)
    try:
        trainer_state = _trainer_state(reader, folder)
        if check is not None:
            check(trainer_state)
        _read(reader, folder, module, optimizer, state, layout, global_names, trainer_state)
    finally:
        state.bytes_read = reader.bytes_read
        reader.close()
    if finish:
        finish_load(optimizer)
    return trainer_state


def _trainer_state(reader, folder) -> dict:
    """trainer_state.json, verified, with the fields every resume reads; anything else is damage (the resume
    falls back to an older checkpoint), never a raw KeyError."""
    state = reader.json(TRAINER_STATE)
    ok = (isinstance(state, dict) and isinstance(state.get("step"), int) and isinstance(state.get("layout"), dict)
          and isinstance(state.get("lrs"), list) and isinstance(state.get("optimizer_step", 0), int))
    if not ok:
        raise JetMoEError(f"{Path(folder) / TRAINER_STATE} lacks its step, layout or lrs; the checkpoint is damaged")
    return state


def finish_load(optimizer) -> None:
    """After read_into on every rank (collective): rebuild working weights from the loaded fp32 partitions."""
    access_for(optimizer).finish_load()


def _read(reader, folder, module, optimizer, state, layout, global_names, trainer_state) -> None:
    weight_map = reader.json(MODEL_INDEX)["weight_map"]
    optim_index = reader.json(OPTIMIZER_INDEX) if reader.has(OPTIMIZER_INDEX) else {}
    masters = optim_index.get(MASTER, {})
    access = access_for(optimizer)
    with_optimizer = optimizer is not None
    if with_optimizer:
        if not all(optim_index.get(key) for key in OPTIMIZER_KEYS):
            raise ResumeMismatch(f"{folder} holds no optimizer state; start from it with model.init_from={folder}")
        access.prepare_load()

    for e in entries(module, name_fn(global_names)):
        if e.name not in weight_map:
            raise ResumeMismatch(f"{folder} has no weight {e.name}; the model config differs from the one it was saved with")
        file = weight_map[e.name]
        whole = tuple(reader.shape(file, e.name))
        expected = (e.param.shape[0] * e.ep_size, *e.param.shape[1:])
        if whole != expected:
            raise ResumeMismatch(f"{folder}: {e.name} has shape {whole}, this model needs {expected}; "
                              "the model config differs from the one it was saved with")
        lo = e.ep_rank * e.param.numel()  # this rank's expert rows are one flat range of the whole tensor
        master = masters.get(e.name)

        def fp32(a, b):  # flat elements [a, b) of the whole weight in fp32
            if master is not None:
                return reader.flat(master["parts"], e.name, a, b)
            return reader.tensor(file, e.name, a, b).float()

        frag = access.fragment(e.param, primary=True)
        if access.partitioned:  # only this rank's ZeRO partition of the fp32 master; finish_load does the rest
            if frag is not None and frag[1]:
                access.set_fragment(e.param, None, fp32(lo + frag[0], lo + frag[0] + frag[1]))
        else:
            access.set(e.param, None, fp32(lo, lo + e.param.numel()).reshape(e.param.shape))
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
    for name, obj in state.states.items():
        saved = trainer_state.get(name)
        if saved is None and name in FLAT_IN_EXTRA:
            saved = {**(trainer_state.get("extra") or {}), "step": trainer_state["step"]}
        if saved is not None and (with_optimizer or name != "scheduler"):
            obj.load_state_dict(saved)
    rng_file = f"rng/rank{layout.rank:05d}.safetensors"
    if trainer_state["layout"].get("world") == layout.world and reader.has(rng_file):
        _, header = reader._header(rng_file)
        rng.restore({k: reader.tensor(rng_file, k) for k in header if k != "__metadata__"},
                    header.get("__metadata__") or {})
    state.step = int(trainer_state["step"])


def _restore_lrs(optimizer, lrs: list[float]) -> None:
    groups = optimizer.param_groups
    if not lrs:
        return
    if len(lrs) != len(groups):  # another layout split the parameters into other groups; lrs are uniform
        lrs = [lrs[0]] * len(groups)
    for g, lr in zip(groups, lrs):
        g["lr"] = lr


def load_tensors(module, access, global_names, source: str, keys, shape, get, has) -> None:
    """Copy whole tensors (this rank's expert rows only) from a source into the module and optimizer.
    shape(key, name) / get(key, name, rows) with key None for the weight, else an optimizer key."""
    for e in entries(module, name_fn(global_names)):
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
