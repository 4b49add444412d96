"""The files one rank writes into a checkpoint, with no collective over data parallelism.

- Weights (`model-pp00[-dp01][-part1].safetensors`): whole tensors in the working dtype, taken from the
  working copy that every dp rank of a stage holds whole. A stage's tensors are spread over its dp ranks
  (largest first onto the least loaded rank). Experts are gathered over their ep group (the only
  collective here), since transformers wants whole tensors.
- Adam moments (`optimizer/exp_avg-pp00[-dp01].safetensors`, ...): the flat fragments this rank's ZeRO-1
  partition holds, keyed by global name, with their place [start, start+numel) in the flattened whole
  tensor (expert rows offset by the ep rank).
- fp32 master weights (`optimizer/master-...`), only when the working copy is not fp32 (bf16 runs): the
  master fragments, laid out like the moments. An fp32 working copy equals the masters after every step,
  so fp32 runs store no second copy. This is DeepSpeed's own split (bf16 model states, fp32 partitions
  with the optimizer), and it keeps a dp gather of the masters out of an async save's blocking part.
- RNG states (`rng/rank00000.safetensors`).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from jetmoe.parallel.topology import Layout
from jetmoe.training.checkpoint import rng
from jetmoe.training.checkpoint.tensors import OPTIMIZER_KEYS, Entry, access_for, entries

MASTER = "master"  # optimizer/index.json key of the fp32 master fragments (bf16 runs)
SHARD_BYTES = 2 << 30  # bounds the writer's host memory on a synchronous save: one shard at a time


def name_fn(global_names: dict[str, str] | Callable | None) -> Callable[[str], str | None]:
    if global_names is None:
        return lambda n: n
    if callable(global_names):
        return global_names
    return global_names.get


def stored_entries(module, global_names) -> list[Entry]:
    """The parameters this stage stores (a pipeline-replicated tied copy is stored by its first stage)."""
    return [e for e in entries(module, name_fn(global_names)) if not getattr(e.param, "ds_pipe_replicated", False)]


def weight_dtype(module) -> torch.dtype:
    """The dtype of the weight files: the working copy's."""
    return next((p.dtype for p in module.parameters()), torch.float32)


def stores_masters(module, optimizer) -> bool:
    """Whether the fp32 masters are stored apart from the weights: a ZeRO optimizer over a non-fp32 model."""
    return access_for(optimizer).partitioned and weight_dtype(module) != torch.float32


def _assign(owned: list[Entry], dp: int) -> list[int]:
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


def _whole_weight(entry: Entry) -> torch.Tensor:
    """The whole working-copy tensor. Experts: rows gathered over the ep group (collective: every rank of
    the group calls this for every expert entry, in the same order)."""
    local = entry.param.detach()
    if entry.ep_group is None:
        return local
    import torch.distributed as dist

    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(entry.ep_size)]
    dist.all_gather(parts, local, group=entry.ep_group)
    return torch.cat(parts, dim=0)


def _sharded(items, stem: str, shard_bytes: int):
    """(name, tensor, part-or-None) -> jobs (file, tensors, metadata, parts), files of at most ~shard_bytes."""
    index, size, tensors, parts = 0, 0, {}, {}
    for name, t, part in items:
        nbytes = t.numel() * t.element_size()
        if tensors and size + nbytes > shard_bytes:
            yield f"{stem}{f'-part{index}' if index else ''}.safetensors", tensors, None, parts
            index, size, tensors, parts = index + 1, 0, {}, {}
        tensors[name] = t
        size += nbytes
        if part is not None:
            parts[name] = part
    if tensors:
        yield f"{stem}{f'-part{index}' if index else ''}.safetensors", tensors, None, parts


def jobs(module, optimizer, layout: Layout, global_names=None, shard_bytes: int = SHARD_BYTES,
         copy: bool = False) -> Iterator[tuple]:
    """This rank's files as (name, tensors, metadata, parts), tensors on the host. Every rank of a stage
    iterates it to the end (the ep gathers of expert weights are collectives)."""
    access = access_for(optimizer)
    owned = stored_entries(module, global_names)
    owner = _assign(owned, layout.dp)
    tag = f"pp{layout.stage:02d}" + (f"-dp{layout.dp_rank:02d}" if layout.dp > 1 else "")

    def weights():
        for e, rank in zip(owned, owner):
            if e.ep_group is not None or rank == layout.dp_rank:
                whole = _whole_weight(e)
                if rank == layout.dp_rank:
                    yield e.name, _host(whole, copy), None

    for name, tensors, _, _ in _sharded(weights(), f"model-{tag}", shard_bytes):
        yield name, tensors, {"format": "pt"}, None
    if optimizer is not None:
        keys = (*OPTIMIZER_KEYS, MASTER) if stores_masters(module, optimizer) else OPTIMIZER_KEYS
        for key in keys:
            def fragments(key=key):
                for e in owned:
                    frag = access.fragment(e.param, primary=layout.dp_rank == 0)
                    if frag is None or frag[1] == 0:
                        continue
                    start = e.ep_rank * e.param.numel() + frag[0]
                    shape = [e.param.shape[0] * e.ep_size, *e.param.shape[1:]]
                    value = access.get_fragment(e.param, None if key == MASTER else key)
                    yield e.name, _host(value, copy), [start, frag[1], shape]

            yield from _sharded(fragments(), f"optimizer/{key}-{tag}", shard_bytes)
    tensors, meta = rng.capture()
    yield f"rng/rank{layout.rank:05d}.safetensors", tensors, meta, None


def optimizer_index(records, keys) -> dict:
    """optimizer/index.json: {key: {name: {"shape": [...], "parts": [[file, start, numel], ...]}}}."""
    out = {key: {} for key in keys}
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
