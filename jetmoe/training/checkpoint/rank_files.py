"""The files one rank writes into a checkpoint, with no collective over data parallelism.

- Weights (`model-pp00[-dp01][-part1].safetensors`): whole tensors in the working dtype, taken from the
  working copy that every dp rank of a stage holds whole. A stage's tensors are spread over its dp ranks
  (largest first onto the least loaded rank). Expert rows are gathered on their writer, since transformers
  wants whole tensors: on the host, over a gloo twin of the ep group, in the writing thread of an async
  save (so its blocking part is the host copy alone).
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


def create_host_groups(module, global_names) -> None:
    """Create the gloo twins of this rank's expert-parallel groups now (members only; main thread)."""
    from jetmoe.parallel.process_group import host_twin

    for e in stored_entries(module, global_names):
        if e.ep_group is not None:
            host_twin(e.ep_group)


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
    """A host tensor. copy (async saves): one that training cannot change underneath the writing thread;
    from a GPU, a pinned buffer filled asynchronously (the caller synchronises once for all copies).
    Otherwise (synchronous saves, written at once): the tensor itself on CPU, a blocking copy from a GPU."""
    t = t.detach()
    if t.is_cuda:
        if not copy:
            return t.cpu()
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)
    return t.clone() if copy else t


class ExpertWhole:
    """An expert tensor that the rank `writer` stores whole, made of every ep rank's rows. The rows are copied
    to the host first; `gather()` then collects them on the writer over a gloo twin of the ep group, so it
    can run in the writing thread while training uses the device groups. Every member of the group calls
    gather() for every such tensor in the same order. Called (in the writing thread), it returns the whole
    tensor (store.CheckpointWriter resolves callables)."""

    def __init__(self, entry: Entry, rows: torch.Tensor, writer: int) -> None:
        from jetmoe.parallel.process_group import host_twin

        self.entry, self.rows, self.writer, self.whole = entry, rows, writer, None
        self.twin = host_twin(entry.ep_group)  # created here, in the main thread

    def numel(self) -> int:
        return self.rows.numel() * self.entry.ep_size

    def element_size(self) -> int:
        return self.rows.element_size()

    def gather(self) -> None:
        import torch.distributed as dist

        mine = dist.get_rank() == self.writer
        parts = [torch.empty_like(self.rows) for _ in range(self.entry.ep_size)] if mine else None
        dist.gather(self.rows.contiguous(), parts, dst=self.writer, group=self.twin)
        if mine:  # twin group rank -> the rows' place: their rank in the ep group
            place = [dist.get_group_rank(self.entry.ep_group, dist.get_global_rank(self.twin, i))
                     for i in range(len(parts))]
            self.whole = torch.cat([parts[place.index(r)] for r in range(len(parts))], dim=0)

    def __call__(self) -> torch.Tensor:
        return self.whole


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
         copy: bool = False, gathers: list | None = None) -> Iterator[tuple]:
    """This rank's files as (name, tensors, metadata, parts), tensors on the host. Every rank of a stage
    iterates it to the end. Expert weights: with `gathers` (a list), their ExpertWhole gathers are appended
    there for the writing thread to run before it writes (the tensors are then callables); without, they
    run here (collectives over the ep group's gloo twin)."""
    access = access_for(optimizer)
    owned = stored_entries(module, global_names)
    owner = _assign(owned, layout.dp)
    tag = f"pp{layout.stage:02d}" + (f"-dp{layout.dp_rank:02d}" if layout.dp > 1 else "")

    def weights():
        import torch.distributed as dist

        for e, rank in zip(owned, owner):
            if e.ep_group is None:
                if rank == layout.dp_rank:
                    yield e.name, _host(e.param, copy), None
                continue
            writer = layout.stage * layout.dp + rank  # global rank (pipeline-major, as DeepSpeed numbers them)
            if writer not in dist.get_process_group_ranks(e.ep_group):
                continue  # another replica of these experts' rows writes them
            whole = ExpertWhole(e, _host(e.param, True), writer)
            if gathers is None:
                if e.param.is_cuda:
                    torch.cuda.synchronize()  # the host copy is complete before gloo reads it
                whole.gather()
                if whole.whole is not None:
                    yield e.name, whole.whole, None
            else:
                gathers.append(whole)
                if writer == layout.rank:
                    yield e.name, whole, None

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
