"""Forward+backward speed of our JetMoE, eager and compiled (train.compile: jetmoe.parallel.compile), against
transformers' JetMoeForCausalLM: same weights, same batch, alternated in one process; medians of repeats. Prints
tokens/s, the achieved GFLOP/s against this machine's measured fp32 matmul rate, the activation memory each
keeps for backward, the peak memory of one step, the last pipeline stage's peak memory with the full and the
chunked head + cross-entropy (8B head shape by default), and the compiled/transformers speed ratio last.

    python bench/model_cpu.py [--repeats 7] [--hidden 384] [--layers 4] [--experts 8] [--batch 4] [--seq 512]
    python bench/model_cpu.py --device cuda --dtype bfloat16      # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import statistics
import time
from pathlib import Path

import torch

from jetmoe.model import JetMoEConfig, JetMoEForCausalLM, causal_lm_loss, linear_causal_lm_loss, set_document_mask
from jetmoe.parallel.compile import compile_blocks, compile_stats


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--head", default="2048,32000,4096", help="hidden,vocab,tokens of the head memory check ('' skips)")
    p.add_argument("--profile", action="store_true", help="also profile one step of each: ms per kind of op")
    return p.parse_args()


def step_flops(c: JetMoEConfig, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward+backward (backward = 2x forward); causal attention counts half."""
    d, k, e, f, v = c.hidden_size, c.num_experts_per_tok, c.num_local_experts, c.intermediate_size, c.vocab_size
    proj = c.num_key_value_heads * c.kv_channels
    per_token_layer = (
        2 * 2 * d * e  # two routers
        + k * 2 * d * proj * 2  # query and output projections of k attention experts
        + 2 * d * 2 * proj  # shared key/value projection
        + k * c.num_key_value_heads * 2 * 2 * c.kv_channels * seq / 2  # scores and weighted values, causal
        + k * (2 * d * 2 * f + 2 * f * d)  # k gated MLP experts
    )
    return 3 * batch * seq * (c.num_hidden_layers * per_token_layer + 2 * d * v)


def matmul_rate(device, dtype, n=1024, repeats=9) -> tuple[float, float]:
    """GFLOP/s of a large matmul, per wall second and per process CPU second (median of repeats)."""
    a = torch.randn(4 * n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        t, c = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    flops = 2 * 4 * n * n * n
    return flops / statistics.median(wall) / 1e9, flops / statistics.median(cpu) / 1e9


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def saved_activation_bytes(model, ids) -> int:
    """Bytes of distinct tensors autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    del loss
    return sum(storages.values())


def _rss_high_water_reset() -> int:
    """Return freed heap to the OS, reset the process's peak RSS (Linux clear_refs 5) and return current RSS bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_step_mib(fn, device) -> float:
    """Peak memory growth of one call of fn: CUDA's allocator peak, or on CPU the resident-set high-water mark."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_high_water_reset()
    fn()
    return (_status_kib("VmHWM") * 1024 - base) / 2**20


def head_memory(hidden_size: int, vocab: int, tokens: int, device, dtype) -> dict:
    """The last stage's head + loss, forward and backward: full [tokens, vocab] logits against the chunked loss."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(tokens, hidden_size, generator=gen) * 0.5).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    variants = {"full": lambda: causal_lm_loss(hidden @ weight.T, labels),
                "chunked": lambda: linear_causal_lm_loss(hidden, weight, labels)}
    out = {}
    for name, loss_fn in variants.items():
        hidden.grad = weight.grad = None
        box = {}

        def step():
            loss = loss_fn()
            loss.backward()
            box["loss"] = float(loss.detach())

        t = time.perf_counter()
        out[name] = (peak_step_mib(step, device), time.perf_counter() - t, box["loss"])
    return out


# Where a step's time goes (torch.profiler self times, by op name): what compiling can and cannot shorten.
PROFILE_KINDS = (("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
                 ("attention", ("scaled_dot_product",)),
                 ("cross-entropy", ("log_softmax", "nll_loss")),
                 ("compiled kernels", ("cpp_fused", "graph_", "triton_", "CompiledFxGraph")))


def profile_kinds(model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, ids)
    out = {kind: 0.0 for kind, _ in PROFILE_KINDS}
    out["other"] = 0.0
    for event in prof.key_averages():
        kind = next((k for k, keys in PROFILE_KINDS if any(key in event.key for key in keys)), "other")
        out[kind] += event.self_cpu_time_total / 1e3
    return out


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import JetMoeConfig as HFConfig, JetMoeForCausalLM as HFModel

    dtype = getattr(torch, args.dtype)
    config = JetMoEConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_key_value_heads=args.kv_heads, kv_channels=args.head_dim,
                          intermediate_size=args.intermediate, num_local_experts=args.experts,
                          num_experts_per_tok=args.top_k, max_position_embeddings=max(args.seq, 512))
    torch.manual_seed(0)
    ours = JetMoEForCausalLM(config).to(args.device, dtype)
    hf_kwargs = {k: v for k, v in config.to_dict().items() if k not in ("z_loss_coef", "gradient_checkpointing")}
    hf_kwargs["output_router_logits"] = True  # so that it trains its aux loss too, as ours does
    hf = HFModel(HFConfig(**hf_kwargs)).to(args.device, dtype)
    hf.config._attn_implementation = "sdpa"
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.config.use_cache = False
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=args.device)

    with torch.no_grad():  # same weights -> same logits (bf16: loosely)
        diff = (ours(ids).logits.float() - hf(ids).logits.float()).abs().max().item()
    set_document_mask(ours, "off")  # as training sets it (data.document_mask=false)
    compiled = copy.deepcopy(ours)
    compile_blocks(compiled.model.layers)
    models = {"eager": ours, "compiled": compiled, "transformers": hf}
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}  # process CPU time: less sensitive to other jobs on the machine
    t = time.perf_counter()
    for _ in range(2):  # warm-up; the compiled model compiles its forward and backward graphs here
        for name in models:
            train_step(models[name], ids)
    warmup_s = time.perf_counter() - t
    frames_after_warmup = compile_stats()["frames"]
    for _ in range(args.repeats):
        for name, model in models.items():
            sync(args.device)
            t, c = time.perf_counter(), time.process_time()
            train_step(model, ids)
            sync(args.device)
            times[name].append(time.perf_counter() - t)
            cpu_times[name].append(time.process_time() - c)

    flops = step_flops(config, args.batch, args.seq)
    peak_wall, peak_cpu = matmul_rate(args.device, dtype)
    tokens = args.batch * args.seq
    on_cpu = torch.device(args.device).type == "cpu"
    print(f"config: hidden {args.hidden}, layers {args.layers}, experts {args.experts} top-{args.top_k}, "
          f"kv {args.kv_heads}x{args.head_dim}, mlp {args.intermediate}, vocab {args.vocab}, batch "
          f"{args.batch}x{args.seq}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"max |logit diff| {diff:.2e}")
    print(f"fp32 matmul rate: {peak_wall:.1f} GFLOP/s wall" + (f", {peak_cpu:.1f} per CPU-second" if on_cpu else "")
          + f"; one step: {flops / 1e9:.1f} GFLOP")
    stats = compile_stats()
    print(f"compiled: {stats['compile_s']:.1f} s compiling ({stats['graphs']} graphs, {stats['graph_breaks']} graph "
          f"breaks) in a {warmup_s:.1f} s warm-up; frames compiled after warm-up: "
          f"{stats['frames'] - frames_after_warmup}")
    for name in models:
        med, fastest = statistics.median(times[name]), min(times[name])
        line = (f"{name:>13}: {tokens / med:8.0f} tokens/s  {flops / med / 1e9:6.1f} GFLOP/s "
                f"({flops / med / 1e9 / peak_wall:4.0%} of matmul)  wall median {med * 1e3:6.0f} ms, min "
                f"{fastest * 1e3:6.0f} ms")
        if on_cpu:
            cpu = statistics.median(cpu_times[name])
            line += f"  CPU {cpu:5.2f} s ({flops / cpu / 1e9 / peak_cpu:4.0%} of matmul per CPU-second)"
        mib = saved_activation_bytes(models[name], ids) / 2**20 if name != "compiled" else None
        peak = peak_step_mib(lambda: train_step(models[name], ids), args.device)
        print(line + (f"  saved activations {mib:.0f} MiB" if mib is not None else "")
              + f"  peak step memory {peak:.0f} MiB")
    if args.head:
        d, v, n = (int(x) for x in args.head.split(","))
        head = head_memory(d, v, n, args.device, dtype)
        print(f"last stage head + loss at hidden {d}, vocab {v}, {n} tokens: " + ", ".join(
            f"{name} peak {mib:.0f} MiB ({sec:.1f} s, loss {loss:.6f})" for name, (mib, sec, loss) in head.items()))
    if args.profile:
        for name, model in models.items():
            kinds = profile_kinds(model, ids)
            print(f"profile {name:>13}: " + ", ".join(f"{k} {ms:.0f} ms" for k, ms in kinds.items())
                  + f" (total {sum(kinds.values()):.0f} ms)")
    med = {name: statistics.median(times[name]) for name in models}
    if on_cpu:
        cpu = {name: statistics.median(cpu_times[name]) for name in models}
        print(f"CPU-time ratios (the steadiest measure on a shared machine): eager/transformers "
              f"{cpu['transformers'] / cpu['eager']:.2f}x, compiled/eager {cpu['eager'] / cpu['compiled']:.2f}x, "
              f"compiled/transformers {cpu['transformers'] / cpu['compiled']:.2f}x")
    print(f"speed ratios: eager/transformers {med['transformers'] / med['eager']:.2f}x, compiled/eager "
          f"{med['eager'] / med['compiled']:.2f}x")
    print(f"speed ratio compiled/transformers: {med['transformers'] / med['compiled']:.2f}x")


if __name__ == "__main__":
    main()
