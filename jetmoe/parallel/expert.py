"""Expert parallelism applied from outside the model.

Each stage's data-parallel group is cut into expert-parallel groups of `ep` consecutive ranks;
inside one, rank r keeps experts [r*E/ep, (r+1)*E/ep) of every sparse layer and tokens reach them
through `AllToAllDispatcher`. Expert parameters then differ between ep peers, so their gradients
may only be reduced over the expert-data-parallel group (the ranks holding the same experts).
DeepSpeed does that for parameters marked `allreduce=False` + `group_name`, but only when the
engine's `has_moe_layers` is set, which it does for its own MoE class alone; `expert_aware_initialize`
sets it for ours.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from jetmoe.errors import JetMoEError
from jetmoe.model import MoA, RouterLoss, iter_sparse_layers
from jetmoe.parallel import deepspeed_internals
from jetmoe.parallel.expert_dispatch import AllToAllDispatcher, CommCounter

EXPERT_WEIGHTS = ("input_linear", "output_linear")


def expert_group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # DeepSpeed's naming; its groups registry is keyed by it


def create_expert_groups(ep_size: int, pp_size: int):
    """Build DeepSpeed's expert (ep) and expert-data (edp) groups; return (ep_group, ep_rank).

    Every rank must call this, in the same order relative to other new_group calls, after the
    default process group exists and before deepspeed.initialize (the engine reads the groups).
    With pipe-major, data-minor rank order, the ep peers of rank g are the `ep` consecutive ranks
    of its stage starting at a multiple of ep, and edp = same position modulo ep inside the stage.
    """
    name = expert_group_name(ep_size)
    deepspeed_internals.ensure_expert_groups(name, ep_size, pp_size)
    group = deepspeed_internals.expert_parallel_group(name)
    return group, dist.get_rank(group)


def iter_expert_layers(module, include_attention: bool = True):
    for name, layer in iter_sparse_layers(module):
        if include_attention or not isinstance(layer, MoA):
            yield name, layer


def apply_expert_parallel(module: torch.nn.Module, ep_group, ep_rank: int, ep_size: int,
                          include_attention: bool = True, counter: CommCounter | None = None):
    """Keep this rank's experts in every sparse layer of `module`, dispatch tokens over ep_group.

    Parameter names stay the same (their leading expert dim shrinks to E/ep). Returns the shared
    CommCounter of the installed dispatchers. ep_size == 1 leaves the module untouched.
    """
    counter = counter if counter is not None else CommCounter()
    if ep_size == 1:
        return counter
    dispatcher = AllToAllDispatcher(ep_group, counter)
    name = expert_group_name(ep_size)
    for layer_name, layer in iter_expert_layers(module, include_attention):
        num_experts = layer.num_experts
        if num_experts % ep_size:
            raise JetMoEError(f"parallel.ep={ep_size} must divide the {num_experts} experts of {layer_name}")
        e_local = num_experts // ep_size
        lo = ep_rank * e_local
        for attr in EXPERT_WEIGHTS:
            experts = getattr(layer, attr)
            weight = experts.weight
            if weight.shape[0] != num_experts:
                raise RuntimeError(f"{layer_name}.{attr} has {weight.shape[0]} experts, expected {num_experts}"
                                   " (expert parallelism applied twice?)")
            local = torch.nn.Parameter(weight.detach()[lo:lo + e_local].clone(), requires_grad=weight.requires_grad)
            mark_expert_param(local, name)
            experts.weight = local
        layer.dispatcher = dispatcher
    return counter


def mark_expert_param(param: torch.nn.Parameter, group_name: str) -> None:
    # What deepspeed.moe.utils.is_moe_param and the ZeRO/engine reductions look for.
    param.allreduce = False
    param.group_name = group_name


def moe_param_groups(param_groups):
    """Split optimizer param groups so each expert group_name gets its own `moe: True` group.

    Needed when the trainer builds the torch optimizer itself (ZeRO-1 partitions a MoE group over
    the expert-data group). Every group needs a 'name'.
    """
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = [dict(g) for g in param_groups]
    for i, g in enumerate(groups):
        g.setdefault("name", f"group{i}")
    return split_params_into_different_moe_groups_for_optimizer(groups)


def expert_parallel_engine(module: torch.nn.Module):
    """Context for `deepspeed.initialize` of a module with expert-marked parameters: the engine then reduces
    their gradients over the expert-data group only (see deepspeed_internals.engine_knows_expert_params)."""
    return deepspeed_internals.engine_knows_expert_params([l.num_experts for _, l in iter_sparse_layers(module)])


def expert_aware_initialize(**kwargs):
    """`deepspeed.initialize(**kwargs)` inside `expert_parallel_engine(kwargs["model"])`."""
    import deepspeed

    with expert_parallel_engine(kwargs["model"]):
        return deepspeed.initialize(**kwargs)


def reduce_tokens_per_expert(router_losses: dict[str, RouterLoss], group=None) -> dict[str, torch.Tensor]:
    """{layer name: LongTensor[E]} of one forward's routed slots (the model output's `router_losses`),
    summed over `group`. One all_reduce for all layers; every rank of the group must hold the same layers."""
    names = list(router_losses)
    counts = [router_losses[n].tokens_per_expert.reshape(-1) for n in names]
    if not counts:
        return {}
    flat = torch.cat(counts).to(torch.long)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flat, group=group)
    return dict(zip(names, torch.split(flat, [c.numel() for c in counts])))
