"""Whole fp32 tensors of a (possibly sharded) model and its Adam state, by transformers' global names.

Three kinds of sharding are undone on save and redone on load:
- ZeRO-1 splits fp32 master weights and optimizer state over the data-parallel group (DeepSpeed's
  safe_get/set_full_* reassemble them; collectives over each parameter's own dp group),
- expert parallelism keeps rows [r*E/ep, (r+1)*E/ep) of each expert tensor on ep rank r,
- pipeline stages hold disjoint parameter sets (each stage writes its own file).
A plain torch optimizer (no DeepSpeed) works too, which is what the unit tests use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

OPTIMIZER_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass
class Entry:
    name: str  # global (transformers) name
    param: torch.nn.Parameter
    ep_group: object | None = None  # set when the local tensor holds this rank's rows of the expert tensor
    ep_rank: int = 0
    ep_size: int = 1


def expert_group_of(param) -> tuple[object | None, int, int]:
    """(group, rank, size) of the expert-parallel group sharding `param`, or (None, 0, 1)."""
    if getattr(param, "allreduce", True) or not getattr(param, "group_name", None):
        return None, 0, 1
    import torch.distributed as dist

    from jetmoe.parallel.deepspeed_internals import expert_parallel_group

    group = expert_parallel_group(param.group_name)
    size = dist.get_world_size(group)
    return (group, dist.get_rank(group), size) if size > 1 else (None, 0, 1)


def entries(module: torch.nn.Module, global_name: Callable[[str], str | None]) -> list[Entry]:
    """One entry per parameter of `module` (tied duplicates once), in module order (the same on every
    rank of a stage, which the collectives below rely on). global_name(local) -> None skips a parameter."""
    out, seen = [], set()
    for local, param in module.named_parameters():
        name = global_name(local)
        if name is None or id(param) in seen:
            continue
        seen.add(id(param))
        group, rank, size = expert_group_of(param)
        out.append(Entry(name, param, group, rank, size))
    return out


# ---------------------------------------------------------------------- access to fp32 values and state
class TorchAccess:
    """A plain torch optimizer (e.g. AdamW) over the module's own parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer

    def get(self, param, key: str | None) -> torch.Tensor:
        if key is None:
            return param.detach().float()
        state = self.optimizer.state.get(param, {})
        return state[key].detach().float() if key in state else torch.zeros_like(param, dtype=torch.float32)

    def set(self, param, key: str | None, value: torch.Tensor) -> None:
        if key is None:
            with torch.no_grad():
                param.copy_(value.to(param.dtype))
            return
        state = self.optimizer.state[param]
        if key not in state:
            state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state[key].copy_(value.to(state[key].dtype))

    def inner(self) -> torch.optim.Optimizer:
        return self.optimizer

    # -- this rank's own fragment (no collective): a flat range [start, start+numel) of the local tensor
    def fragment(self, param, primary: bool) -> tuple[int, int] | None:
        """(start, numel) in the flattened local tensor whose optimizer state this rank owns, or None.
        A plain optimizer's state is replicated: the primary (dp rank 0) owns all of it."""
        return (0, param.numel()) if primary else None

    def get_fragment(self, param, key: str | None) -> torch.Tensor:
        return self.get(param, key).reshape(-1)

    def set_fragment(self, param, key: str, value: torch.Tensor) -> None:
        self.set(param, key, value.reshape(param.shape))

    partitioned = False  # True: weights load by fragment, then finish_load() rebuilds the working copies

    def finish_load(self) -> None:
        pass

    def step_tensors(self) -> Iterator[tuple[dict, torch.Tensor]]:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                yield self.optimizer.state[p], p

    def prepare_load(self) -> None:
        """Before the first step torch's Adam has no state; create it as its first step would (zeros)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                state = self.optimizer.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for key in OPTIMIZER_KEYS:
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


class ZeroAccess(TorchAccess):
    """DeepSpeed's ZeRO-1/2 optimizer or its BF16_Optimizer (bf16 weights, fp32 accumulation): fp32 masters
    and Adam moments partitioned over dp, one flat partition per param group."""

    def __init__(self, zero_optimizer) -> None:
        super().__init__(zero_optimizer.optimizer)
        self.zero = zero_optimizer
        if self._states_exist():
            self._relink()

    def _relink(self) -> None:
        from jetmoe.parallel.deepspeed_internals import relink_optimizer_state

        relink_optimizer_state(self.zero)

    def get(self, param, key):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if key is None:
            return safe_get_full_fp32_param(param).float()
        if not self._states_exist():
            # no step taken yet: the moments are zero; keep the collective pattern identical on all ranks
            return safe_get_full_fp32_param(param).float().zero_()
        return safe_get_full_optimizer_state(param, key).float()

    def set(self, param, key, value):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(torch.float32)
        if key is None:
            safe_set_full_fp32_param(param, value)  # this rank's fp32 master fragment
            with torch.no_grad():  # and the whole working copy (every rank holds the full tensor)
                param.copy_(value.to(param.dtype))
        else:
            safe_set_full_optimizer_state(param, value, key)

    def fragment(self, param, primary: bool) -> tuple[int, int] | None:
        from jetmoe.parallel.deepspeed_internals import zero_fragment

        mapping = zero_fragment(param)
        if mapping is None:
            return None
        address = mapping.lp_fragment_address
        return int(address.start), int(address.numel)

    def get_fragment(self, param, key: str | None) -> torch.Tensor:
        """key None: this rank's fragment of the fp32 master."""
        from jetmoe.parallel.deepspeed_internals import zero_fragment

        mapping = zero_fragment(param)
        if key is None:
            return mapping.hp_fragment.detach().float()
        if not self._states_exist():
            return torch.zeros(mapping.lp_fragment_address.numel, dtype=torch.float32)
        return mapping.get_optim_state_fragment(key).detach().float()

    def set_fragment(self, param, key: str | None, value: torch.Tensor) -> None:
        """key None: the fp32 master fragment (finish_load then rebuilds every rank's working copy)."""
        from jetmoe.parallel.deepspeed_internals import zero_fragment

        mapping = zero_fragment(param)
        target = mapping.hp_fragment if key is None else mapping.get_optim_state_fragment(key)
        target.data.copy_(value.to(target.dtype).reshape(-1))

    partitioned = True

    def finish_load(self) -> None:
        """Collective over dp: working copies from the loaded fp32 partitions (DeepSpeed's own universal-
        checkpoint load does the same), so no rank reads weights beyond its partition."""
        self.zero.update_lp_params()

    def _flat_partitions(self):
        flat = getattr(self.zero, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
        return list(flat if flat is not None else self.zero.fp32_groups_flat_partition)  # BF16_Optimizer

    def _states_exist(self) -> bool:
        return all(len(self.optimizer.state.get(p, {})) > 0 for p in self._flat_partitions())

    def prepare_load(self) -> None:
        """Before the first step the Adam state does not exist yet; create it (zeros) and link DeepSpeed's
        per-parameter views to it so safe_set_full_optimizer_state has somewhere to write."""
        for flat in self._flat_partitions():
            state = self.optimizer.state[flat]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in OPTIMIZER_KEYS:
                    state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        self._relink()

    def step_tensors(self):
        for flat in self._flat_partitions():
            yield self.optimizer.state[flat], flat


def access_for(optimizer) -> TorchAccess:
    if optimizer is not None and (hasattr(optimizer, "single_partition_of_fp32_groups")
                                  or hasattr(optimizer, "fp32_groups_flat_partition")):
        return ZeroAccess(optimizer)
    if optimizer is not None and hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        raise NotImplementedError(f"checkpointing {type(optimizer).__name__} is not supported (use ZeRO stage 1)")
    return TorchAccess(optimizer)


def optimizer_step(access: TorchAccess) -> int:
    for state, _ in access.step_tensors():
        if "step" in state:
            return int(state["step"])
    return 0


def set_optimizer_step(access: TorchAccess, step: int) -> None:
    for state, _ in access.step_tensors():
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


# ------------------------------------------------------------------------------------------- expert rows
def local_rows(entry: Entry, whole_rows: int) -> slice | None:
    """Rows of the whole tensor this rank holds (None: all of it)."""
    if entry.ep_group is None:
        return None
    per = whole_rows // entry.ep_size
    return slice(entry.ep_rank * per, (entry.ep_rank + 1) * per)
