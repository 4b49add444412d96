"""Where a non-finite step came from: the step is replayed with every module of every stage watched.

Nothing is watched in ordinary steps (no hooks, no cost). When a step's loss or gradient is not finite (DeepSpeed
skipped its update), the trainer replays the same micro-batches through the pipeline with forward hooks that
check each module's output and tensor hooks that check the gradient arriving at each output. The replay updates
nothing (the update gate is closed; the engine's counters, the LR schedule and the random state are put back). Each rank reports the first event it saw; the first of all is the source:

- a forward value: the earliest micro-batch, then the earliest stage (values flow forward), then the first
  module to finish on that rank (hooks fire when a module returns, so the innermost module comes first);
- else a gradient at a module's output: the earliest micro-batch, then the latest stage (gradients flow back),
  then the first module reached by backward on that rank.

Names are transformers' (model.layers.4.mlp.output_linear), described as "block 4 MoE experts (output_linear)".
"""

from __future__ import annotations

import contextlib
import socket

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_leaves

from jetmoe.parallel.pipeline import stage_layers

_PARTS = {"self_attention": "MoA", "mlp": "MoE", "router": "router", "experts": "experts",
          "input_linear": "experts", "output_linear": "experts", "embed_tokens": "embedding", "norm": "final norm",
          "lm_head": "head", "input_layernorm": "attention norm", "post_attention_layernorm": "MLP norm"}


def describe(name: str) -> str:
    """'model.layers.4.mlp.output_linear' -> 'block 4 MoE experts (output_linear)'."""
    parts = name.split(".")
    words = []
    for i, part in enumerate(parts):
        if part == "layers" and i + 1 < len(parts):
            words.append(f"block {parts[i + 1]}")
        elif part in _PARTS and _PARTS[part] not in words:
            words.append(_PARTS[part])
    leaf = parts[-1]
    if leaf in ("input_linear", "output_linear", "kv_proj"):
        words.append(f"({leaf})")
    return " ".join(words) or name


def _bad(value) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
               for t in tree_leaves(value))


class _Watch:
    """Hooks on every module of one stage; remembers the first non-finite forward output and output gradient."""

    def __init__(self, stage_module):
        self.stage_module = stage_module
        self.names = {}  # module -> transformers' name
        for prefix, adapter in stage_layers(stage_module).items():
            for name, module in adapter.named_modules():
                self.names[module] = (adapter.model_prefix + name).rstrip(".") or type(adapter).__name__
        self.micro_batch = -1
        self.seq = 0
        self.forward: tuple | None = None  # (micro_batch, seq, name)
        self.backward: tuple | None = None

    def _on_forward(self, module, args, output):
        self.seq += 1
        mb, seq, name = self.micro_batch, self.seq, self.names[module]
        if self.forward is None and _bad(output):
            self.forward = (mb, seq, name)
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda grad, mb=mb, name=name: self._on_grad(mb, name, grad))

    def _on_grad(self, mb, name, grad):
        self.seq += 1
        if self.backward is None and grad is not None and not bool(torch.isfinite(grad).all()):
            self.backward = (mb, self.seq, name)

    def _on_stage_input(self, module, args):
        self.micro_batch += 1

    @contextlib.contextmanager
    def hooks(self):
        handles = [self.stage_module.register_forward_pre_hook(self._on_stage_input)]
        handles += [m.register_forward_hook(self._on_forward) for m in self.names]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def trace_step(engine, batches: list, stage: int, rank: int, gate, keep: list) -> dict | None:
    """Replay one step's micro-batches with every module watched; returns the source, the same on every rank:
    {"what": "output"|"gradient", "module", "where", "stage", "rank", "host", "micro_batch"},
    or None when the replay was finite everywhere. gate: a context manager factory closing the update; keep: objects
    with state_dict / load_state_dict put back afterwards (the engine's counters, the LR scheduler). Collective."""
    saved = [k.state_dict() for k in keep]
    lrs = [group["lr"] for group in engine.optimizer.param_groups]
    watch = _Watch(engine.module)
    device = next(engine.module.parameters()).device
    # fork_rng: the replay's random draws (dropout) leave the run's random stream as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), gate(), watch.hooks():
        engine.train_batch(data_iter=iter(batches))
    for k, state in zip(keep, saved):
        k.load_state_dict(state)
    for group, lr in zip(engine.optimizer.param_groups, lrs):
        group["lr"] = lr
    mine = None
    if watch.forward is not None:
        mb, seq, name = watch.forward
        mine = ((0, mb, stage, seq, rank), "output", name, mb)
    elif watch.backward is not None:
        mb, seq, name = watch.backward
        mine = ((1, mb, -stage, seq, rank), "gradient", name, mb)
    if mine is not None:
        mine = (*mine, socket.gethostname())
    found = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, mine)
    found = [f for f in found if f is not None]
    if not found:
        return None
    key, what, name, mb, host = min(found, key=lambda f: f[0])
    return {"what": what, "module": name, "where": describe(name), "stage": key[2] if key[0] != 1 else -key[2],
            "rank": key[-1], "host": host, "micro_batch": mb}


def sentence(found: dict | None) -> str:
    """One line for the console and the error."""
    if found is None:
        return "replayed with checks, every module's output and gradient was finite (the loss function or an " \
               "update that went non-finite earlier)"
    return (f"first non-finite {found['what']}: {found['where']} ({found['module']}) on stage {found['stage']}, "
            f"rank {found['rank']} ({found['host']}, micro-batch {found['micro_batch']})")
