#!/usr/bin/env python
"""Communication and pipeline-bubble benchmark of the parallel layouts, on a fixed tiny config.

    torchrun --nproc_per_node 6 bench/parallel.py                 # pp=3, dp=2, ep=2 (default)
    torchrun --nproc_per_node 2 bench/parallel.py --pp 1 --ep 2   # any layout; extra args = Hydra overrides

Runs the real trainer (DeepSpeed PipelineEngine, ZeRO-1) and reports, per optimizer step, summed over
all ranks, after a warm-up step (the first step also sends tensor shapes):
- bytes the expert all-to-alls sent off-rank (counted in the dispatcher) against the analytic count
  from the slots the routers sent to other ep ranks (`all_to_all_bytes`), and against uniform routing;
- bytes the pipeline's p2p sends moved (counted in a wrapper of deepspeed's p2p.send) against
  dp * (pp-1) * m * (2 * hidden + position ids);
- the measured 1F1B bubble (1 - forward/backward busy time / step span, averaged over ranks; the span
  runs from the earliest rank's step start to the last rank's last backward) against (p-1)/(m+p-1).
Ratios should be 1.00 for bytes. The bubble on an oversubscribed CPU is only indicative.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

TINY = ["data.seq_len=32", "model.hidden_size=64", "model.num_hidden_layers=3", "model.num_key_value_heads=2",
        "model.kv_channels=16", "model.intermediate_size=64", "logging.wandb.mode=disabled",
        "logging.progress_bar=false", "logging.console=false", "logging.router_every=0", "train.eval_every=0"]


class StageTimer:
    """Wall-clock intervals of the ForwardPass / BackwardPass instructions of one pipeline engine."""

    def __init__(self, engine):
        from deepspeed.runtime.pipe import schedule

        self.intervals: list[tuple[float, float]] = []
        table = dict(type(engine)._INSTRUCTION_MAP)
        for kind in (schedule.ForwardPass, schedule.BackwardPass):
            table[kind] = self._timed(table[kind])
        engine._INSTRUCTION_MAP = table  # the engine looks the table up on the instance

    def _timed(self, fn):
        def run(engine, **kwargs):
            start = time.time()
            fn(engine, **kwargs)
            self.intervals.append((start, time.time()))

        return run


class P2PCounter:
    """Bytes sent through deepspeed's pipeline p2p.send."""

    def __init__(self):
        from deepspeed.runtime.pipe import p2p

        self.bytes_sent = 0
        original = p2p.send

        def send(tensor, dest_stage, async_op=False):
            self.bytes_sent += tensor.numel() * tensor.element_size()
            return original(tensor, dest_stage, async_op)

        p2p.send = send


class RoutedSlots:
    """Per sparse layer of this stage: slots this rank routed to experts of other ep ranks."""

    def __init__(self, module, ep: int, ep_rank: int):
        from jetmoe.model import MoA, iter_sparse_layers

        self.remote = {"moa": 0, "moe": 0}
        self.slots = {"moa": 0, "moe": 0}
        for _, layer in iter_sparse_layers(module):
            kind = "moa" if isinstance(layer, MoA) else "moe"
            e_local = layer.num_experts // ep
            mine = slice(ep_rank * e_local, (ep_rank + 1) * e_local)
            layer.register_forward_hook(self._hook(kind, mine))

    def _hook(self, kind, mine):
        def hook(layer, args, out):
            counts = out[1].tokens_per_expert  # a sparse layer returns (output, its RouterLoss)
            self.slots[kind] += int(counts.sum())
            self.remote[kind] += int(counts.sum() - counts[mine].sum())

        return hook

    def reset(self):
        self.remote = dict.fromkeys(self.remote, 0)
        self.slots = dict.fromkeys(self.slots, 0)


def all_to_all_bytes(remote: dict, hidden: int, attn_width: int, element: int) -> int:
    """Each slot routed off-rank moves in four all-to-alls (dispatch, combine, and their backwards)
    per round trip, once from its own rank and once back from the expert's: summed over the ep group
    every routed-away slot costs 2 * (d_in + d_out) rows of bytes per round trip. MoE: one round trip
    hidden -> hidden; MoA: two, hidden -> heads*head_dim and back."""
    moe = 2 * (hidden + hidden) * remote["moe"]
    moa = 2 * (hidden + attn_width) * 2 * remote["moa"]
    return (moe + moa) * element


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=3)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="measured steps (after one warm-up step)")
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step per dp rank (m)")
    args, overrides = parser.parse_known_args(argv)

    from jetmoe.model import iter_sparse_layers
    from jetmoe.parallel.expert_dispatch import AllToAllDispatcher
    from jetmoe.training.compose import load
    from jetmoe.training.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // args.pp
    config = load([*TINY, f"parallel.pp={args.pp}", f"parallel.ep={args.ep}", "train.micro_batch_size=1",
                   f"train.global_batch_size={args.micro_batches * dp}", f"train.max_steps={args.steps + 1}",
                   *overrides])
    out = Path("/tmp") / f"jetmoe_bench_parallel_{world}"
    trainer = Trainer(config, out).setup()
    engine, layout, mc = trainer.engine, trainer.layout, trainer.model_config
    counters = {id(layer.dispatcher.counter): layer.dispatcher.counter
                for _, layer in iter_sparse_layers(trainer.parts.module)
                if isinstance(layer.dispatcher, AllToAllDispatcher)}
    timer, p2p_counter = StageTimer(engine), P2PCounter()
    routed = RoutedSlots(trainer.parts.module, layout.ep, layout.ep_rank)

    trainer.train_step()  # warm-up: tensor-shape messages, first-touch allocations
    for c in counters.values():
        c.reset()
    routed.reset()
    p2p_counter.bytes_sent = 0
    timer.intervals.clear()
    starts, ends, busy = [], [], []
    for _ in range(args.steps):
        mark = len(timer.intervals)
        starts.append(time.time())
        trainer.train_step()
        step = timer.intervals[mark:]
        busy.append(sum(b - a for a, b in step))
        ends.append(max(b for _, b in step))
    trainer.close()

    element = 2 if trainer.parts.ds_config["bf16"]["enabled"] else 4
    d, attn = mc.hidden_size, mc.num_key_value_heads * mc.kv_channels
    measured_a2a = sum(c.bytes_sent for c in counters.values())
    analytic_a2a = all_to_all_bytes(routed.remote, d, attn, element)
    uniform_remote = {k: v * (layout.ep - 1) / layout.ep for k, v in routed.slots.items()}
    uniform_a2a = all_to_all_bytes(uniform_remote, d, attn, element)
    totals = torch.tensor([measured_a2a, analytic_a2a, uniform_a2a, p2p_counter.bytes_sent], dtype=torch.float64)
    dist.all_reduce(totals)
    starts, ends = torch.tensor(starts, dtype=torch.float64), torch.tensor(ends, dtype=torch.float64)
    dist.all_reduce(starts, op=dist.ReduceOp.MIN)
    dist.all_reduce(ends, op=dist.ReduceOp.MAX)
    bubble = 1 - torch.tensor(busy, dtype=torch.float64).sum() / (ends - starts).sum()
    dist.all_reduce(bubble)
    bubble = float(bubble) / dist.get_world_size()

    if dist.get_rank() == 0:
        steps, m, p = args.steps, args.micro_batches, layout.pp
        a2a, a2a_analytic, a2a_uniform, p2p_bytes = (float(x) / steps for x in totals)
        tokens = config.train.micro_batch_size * config.data.seq_len
        p2p_analytic = layout.dp * (p - 1) * m * tokens * (2 * d * element + 8)  # hidden fwd+grad, int64 ids
        theory = (p - 1) / (m + p - 1)
        print(f"layout {layout.describe()} | m={m} micro-batches/step/dp-rank | {tokens} tokens each | "
              f"hidden {d} | {'fp32' if element == 4 else 'bf16'} | {steps} measured steps")
        if layout.ep > 1:
            print(f"all-to-all bytes/step   measured {a2a:12,.0f} | analytic (routed slots) {a2a_analytic:12,.0f} "
                  f"| ratio {a2a / a2a_analytic:.3f} | uniform routing {a2a_uniform:12,.0f} "
                  f"(ratio {a2a / a2a_uniform:.3f})")
        if p > 1:
            print(f"pipeline p2p bytes/step measured {p2p_bytes:12,.0f} | analytic {p2p_analytic:12,.0f} "
                  f"| ratio {p2p_bytes / p2p_analytic:.3f}")
            print(f"1F1B bubble             measured {bubble:.3f} | (p-1)/(m+p-1) = {theory:.3f} "
                  f"| ratio {bubble / theory:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
