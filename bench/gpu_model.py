"""The GPU check's model-level sections (see bench/gpu.py): a stack of 8B blocks, its profile by aten op, and
train.compile's compiled block against eager. Each fills `out` as it goes."""

from __future__ import annotations

import time
import warnings

import torch

from gpu_env import Env, block_flops_per_token, blocks, run_stack
from jetmoe.diagnostics import count_host_syncs
from jetmoe.model import causal_lm_loss, linear_causal_lm_loss
from jetmoe.plan.memory import block_activation_bytes
from jetmoe.plan.params import ModelShape, block_params


def section_stack(env: Env, out: dict) -> None:
    layouts = [(2, 1), (2, 2), (4, 1), (4, 2)] if not env.smoke else [(2, 1), (2, 2)]
    shape = ModelShape.from_config(env.config)
    p = torch.tensor([], dtype=env.dtype).element_size()
    out["block_flops_per_token"] = block_flops_per_token(env)
    rows = out["rows"] = []
    for n, mb in layouts:
        stack = blocks(env, n)
        g = torch.Generator(device=env.device).manual_seed(0)
        x = torch.randn(mb, env.seq, env.config.hidden_size, device=env.device, generator=g)
        x = x.to(env.dtype).requires_grad_()
        base = env.memory_base()
        ms = env.time_ms(lambda: run_stack(stack, x))
        tokens = mb * env.seq
        tflops = tokens * n * block_flops_per_token(env) / (ms / 1e3) / 1e12
        rows.append(dict(blocks=n, micro_batch=mb, ms_per_block_per_micro_batch=ms / n / mb,
                         tokens_per_s=tokens / (ms / 1e3), tflops=tflops, mfu=tflops / env.peak if env.peak else None,
                         planner_activation_mib_per_block=block_activation_bytes(shape, mb, env.seq, p) / 2**20,
                         weight_grad_mib_per_block=block_params(shape).total * p / 2**20,
                         peak_mib_per_block=(env.peak_mib_since(base) or 0) / n if env.cuda else None))
        del stack, x
    # The head + cross-entropy alone (tied head: a V x D matmul, fp32 loss).
    g = torch.Generator(device=env.device).manual_seed(0)
    d, v = env.config.hidden_size, env.config.vocab_size
    w = (torch.randn(v, d, device=env.device, generator=g) * 0.02).to(env.dtype).requires_grad_()
    h = torch.randn(1, env.seq, d, device=env.device, generator=g).to(env.dtype).requires_grad_()
    labels = torch.randint(0, v, (1, env.seq), device=env.device, generator=g)
    out["head_and_loss_ms_per_micro_batch"] = env.time_ms(lambda: causal_lm_loss(h @ w.T, labels).backward())


# An aten op's bucket, by the op's name (device time per op from the profiler: Hopper's GEMM kernels are
# called nvjet_* or cutlass*, names no list of kernel substrings keeps up with).
OP_BUCKETS = (
    ("grouped_gemm", ("aten::_grouped_mm", "jetmoe::grouped_mm")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    ("attention", ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention",
                   "aten::_cudnn_attention", "flex_attention")),
    ("index_sort_scatter", ("aten::index", "aten::sort", "aten::argsort", "aten::scatter", "aten::gather",
                            "aten::cumsum", "aten::bincount", "aten::histc", "aten::repeat_interleave",
                            "aten::topk", "aten::one_hot")),
)


def op_bucket(op: str) -> str:
    for bucket, prefixes in OP_BUCKETS:
        if op.startswith(prefixes):
            return bucket
    return "elementwise_other"


def section_profile(env: Env, out: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    stack = blocks(env, 2)
    g = torch.Generator(device=env.device).manual_seed(0)
    x = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, generator=g).to(env.dtype)
    x.requires_grad_()
    run_stack(stack, x)  # warm-up
    env.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run_stack(stack, x)
        env.sync()
    wall_us = (time.perf_counter() - t0) * 1e6
    by_op: dict[str, float] = {}
    for e in prof.key_averages():  # self time: each kernel counted once, under the op that launched it
        if e.device_type != torch.autograd.DeviceType.CPU:  # the kernels' own rows: counted through their ops
            continue
        own = getattr(e, "self_device_time_total", 0.0) if env.cuda else e.self_cpu_time_total
        if own > 0 and "::" in e.key:
            by_op[e.key] = by_op.get(e.key, 0.0) + own
    buckets: dict[str, float] = {}
    for op, us in by_op.items():
        buckets[op_bucket(op)] = buckets.get(op_bucket(op), 0.0) + us
    busy = sum(buckets.values())
    out["bucket_ms"] = {k: v / 1e3 for k, v in sorted(buckets.items())}
    out["bucket_share"] = {k: v / busy for k, v in sorted(buckets.items())} if busy else {}
    out["top_ops_ms"] = {k: v / 1e3 for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:10]}
    if env.cuda:
        kernels: dict[str, float] = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total
        total = sum(kernels.values())
        out["top_kernels_ms"] = {k[:120]: v / 1e3 for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:10]}
        out["kernel_ms_total"] = total / 1e3
        out["unattributed_kernel_ms"] = (total - busy) / 1e3  # kernels no aten op claims (should be ~0)
        out["busy_percent"] = 100 * total / wall_us
    # Host syncs of one block's forward+backward: counted by op (any device), and by CUDA's sync debug mode.
    with count_host_syncs() as counts:
        run_stack(stack[:1], x)
    out["host_syncs_per_block"] = sum(counts.values())
    if env.cuda:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run_stack(stack[:1], x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        out["cuda_sync_debug_warnings_per_block"] = len(syncs)
        out["cuda_sync_sites"] = sorted({f"{w.filename}:{w.lineno}" for w in syncs})


def section_compile(env: Env, out: dict, enabled: bool) -> None:
    """Eager against train.compile's compiled block (jetmoe.parallel.compile: one graph per block), forward+backward,
    same weights and input; then inputs whose expert counts differ must compile nothing new. compile_s and
    graph_breaks are this section's own (Dynamo's counters are process-wide). Also the last stage's head + loss."""
    if not enabled:
        out["skipped"] = "pass --compile on (on by default on a GPU)"
        return
    from jetmoe.parallel.compile import compile_blocks, compile_stats

    before = compile_stats()
    block = blocks(env, 1)
    compiled = blocks(env, 1)  # same seed: same weights
    compile_blocks(compiled)
    g = torch.Generator(device=env.device).manual_seed(0)
    x = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, generator=g).to(env.dtype)
    x.requires_grad_()
    out["eager_ms"] = env.time_ms(lambda: run_stack(block, x))
    t0 = time.perf_counter()
    run_stack(compiled, x)
    env.sync()
    out["first_call_s"] = time.perf_counter() - t0
    warm = compile_stats()
    out["compiled_ms"] = env.time_ms(lambda: run_stack(compiled, x))
    out["speedup"] = out["eager_ms"] / out["compiled_ms"]
    for seed in (1, 2):  # other tokens, other expert counts
        g.manual_seed(seed)
        run_stack(compiled, torch.randn(x.shape, device=env.device, generator=g).to(env.dtype).requires_grad_())
    after = compile_stats()
    out.update(compile_s=after["compile_s"] - before["compile_s"],
               graph_breaks=after["graph_breaks"] - before["graph_breaks"],
               graphs=after["graphs"] - before["graphs"],
               frames_compiled_after_warmup=after["frames"] - warm["frames"])
    out.update(head_memory(env))


def head_memory(env: Env) -> dict:
    """The last stage's head + loss at this shape (8B: 2048 x 32000, 4096 tokens): peak memory and time."""
    g = torch.Generator(device=env.device).manual_seed(0)
    d, v = env.config.hidden_size, env.config.vocab_size
    h = torch.randn(env.seq, d, device=env.device, generator=g).to(env.dtype).requires_grad_()
    w = (torch.randn(v, d, device=env.device, generator=g) * 0.02).to(env.dtype).requires_grad_()
    labels = torch.randint(0, v, (env.seq,), device=env.device, generator=g)
    out = {}
    for name, fn in (("full", lambda: causal_lm_loss(h @ w.T, labels)),
                     ("chunked", lambda: linear_causal_lm_loss(h, w, labels))):
        def step():
            h.grad = w.grad = None
            fn().backward()
        step()
        env.sync()
        base = env.memory_base()
        out[f"head_{name}_ms"] = env.time_ms(step, repeats=3, warmup=0)
        if env.cuda:
            out[f"head_{name}_peak_mib"] = env.peak_mib_since(base)
    return out
