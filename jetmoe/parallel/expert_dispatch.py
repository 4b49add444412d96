"""Dropless expert-parallel token dispatch over an expert-parallel process group.

Each of the `ep` ranks of the group holds `E / ep` consecutive experts (rank r: experts
[r*E_local, (r+1)*E_local)). A plan, built once per layer and micro-batch from the router's top-k
choices, fixes the token layout of both directions:

  local slots (T*k) --sort by expert--> send buffer, grouped by destination rank
     --all_to_all_single (uneven splits)--> receive buffer, grouped by (source rank, local expert)
     --permute--> rows grouped by local expert (what the layer's grouped matmul wants)

`combine` runs the same path backwards. MoA reuses one plan for its two round trips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from jetmoe.model.experts import GroupSizes, gather_slots, permute_rows
from jetmoe.model.router import expert_counts


class CommCounter:
    """Bytes this rank sent to other ranks through the all-to-alls (forward and backward)."""

    def __init__(self):
        self.bytes_sent = 0
        self.calls = 0

    def reset(self):
        self.bytes_sent = 0
        self.calls = 0


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group,
                counter: CommCounter | None) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits,
                           group=group)
    if counter is not None:
        me = dist.get_rank(group)
        row_bytes = x[0:1].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        counter.bytes_sent += sum(n for r, n in enumerate(input_splits) if r != me) * row_bytes
        counter.calls += 1
    return out


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse all_to_all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group, counter):
        ctx.splits = (output_splits, input_splits)
        ctx.group = group
        ctx.counter = counter
        return _all_to_all(x, output_splits, input_splits, group, counter)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group, ctx.counter), None, None, None, None


def all_to_all(x, output_splits, input_splits, group, counter=None):
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, counter)


@dataclass
class AllToAllPlan:
    num_slots: int  # T * k
    top_k: int
    slot_order: torch.Tensor  # [T*k] slots sorted by expert (stable)
    slot_unorder: torch.Tensor  # inverse permutation of slot_order
    send_splits: list[int]  # rows to each ep rank
    recv_splits: list[int]  # rows from each ep rank
    recv_to_local: torch.Tensor  # receive-buffer rows -> grouped by local expert
    local_to_recv: torch.Tensor  # its inverse
    tokens_per_local_expert: torch.Tensor  # LongTensor[E_local]
    group_sizes: GroupSizes  # the same, with its host copy (fetched in the plan's one sync)


class AllToAllDispatcher:
    """Dispatcher (protocol of jetmoe.model's LocalDispatcher) that spreads experts over `group`."""

    def __init__(self, group=None, counter: CommCounter | None = None):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.counter = counter if counter is not None else CommCounter()

    @torch.compiler.disable  # collectives and routing-sized rows: kept out of compiled graphs
    def plan(self, expert_ids: torch.Tensor, num_experts: int) -> AllToAllPlan:
        ep = self.ep_size
        if num_experts % ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by ep={ep}")
        e_local = num_experts // ep
        top_k = expert_ids.shape[-1]
        flat = expert_ids.reshape(-1)
        slot_order = torch.argsort(flat, stable=True)
        slot_unorder = torch.empty_like(slot_order)
        slot_unorder[slot_order] = torch.arange(slot_order.numel(), device=slot_order.device)
        counts = expert_counts(expert_ids, num_experts)  # [E] slots per global expert, no host sync
        # recv_counts[j, e]: rows rank j sends to my local expert e (one equal-split exchange, on device).
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        # The layer's one host sync: the splits of the all-to-alls and the per-expert row counts.
        host = torch.cat([counts, recv_counts]).tolist()
        sent, got = host[:num_experts], host[num_experts:]
        send_splits = [sum(sent[r * e_local:(r + 1) * e_local]) for r in range(ep)]
        recv_splits = [sum(got[j * e_local:(j + 1) * e_local]) for j in range(ep)]
        local_sizes = [sum(got[j * e_local + e] for j in range(ep)) for e in range(e_local)]
        # The receive buffer is ordered (source rank, local expert); the grouped matmul wants
        # (local expert, source rank). A stable sort on the expert index of each row does it.
        block = torch.arange(ep * e_local, device=flat.device)
        row_block = torch.repeat_interleave(block, recv_counts, output_size=sum(recv_splits))
        recv_to_local = torch.argsort(row_block % e_local, stable=True)
        local_to_recv = torch.empty_like(recv_to_local)
        local_to_recv[recv_to_local] = torch.arange(recv_to_local.numel(), device=flat.device)
        tokens_per_local_expert = recv_counts.view(ep, e_local).sum(0)
        return AllToAllPlan(
            num_slots=flat.numel(),
            top_k=top_k,
            slot_order=slot_order,
            slot_unorder=slot_unorder,
            send_splits=send_splits,
            recv_splits=recv_splits,
            recv_to_local=recv_to_local,
            local_to_recv=local_to_recv,
            tokens_per_local_expert=tokens_per_local_expert,
            group_sizes=GroupSizes(tokens_per_local_expert, local_sizes),
        )

    @torch.compiler.disable  # collectives and routing-sized rows: kept out of compiled graphs
    def dispatch(self, x: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        """x [T, D] (one row per token, shared by its k slots) or [T, k, D] -> this rank's expert rows."""
        send = gather_slots(x, plan.slot_order, plan.slot_unorder, plan.top_k)
        received = all_to_all(send, plan.recv_splits, plan.send_splits, self.group, self.counter)
        return permute_rows(received, plan.recv_to_local, plan.local_to_recv)

    @torch.compiler.disable  # collectives and routing-sized rows: kept out of compiled graphs
    def combine(self, y_local: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        received = permute_rows(y_local, plan.local_to_recv, plan.recv_to_local)
        sent_back = all_to_all(received, plan.send_splits, plan.recv_splits, self.group, self.counter)
        y = permute_rows(sent_back, plan.slot_unorder, plan.slot_order)
        return y.view(plan.num_slots // plan.top_k, plan.top_k, y.shape[-1])
