#!/usr/bin/env python
"""The GPU check (issue 11): what only a GPU can show, measured once on one H100/H200 in under 8 minutes.

    python bench/gpu.py --out gpu_check.json           # on one GPU
    python bench/gpu.py --smoke --out smoke.json       # every section at tiny shapes, on CPU (CI runs this)

Sections (each one's result or error goes into the JSON; one failing section does not stop the others):
  versions        torch, CUDA, cuDNN, GPU
  stack           JetMoE-8B-shaped blocks (2 and 4, micro-batch 1 and 2, 4096 tokens), bf16 forward+backward:
                  ms per block per micro-batch, tokens/s, TFLOP/s, MFU, peak memory per block against the
                  planner's estimate; the head + cross-entropy on its own
  profile         one iteration's kernel time in buckets (grouped GEMM, other matmuls, attention,
                  index/sort/scatter, elementwise), device busy %, host syncs per block
  sdpa            SDPA backends at the model's shapes, causal and with a document mask (dense and FlexAttention)
  grouped_gemm    expert shapes with balanced, skewed and one-empty-expert counts against a per-expert loop and
                  a dense matmul of equal FLOPs; the empty expert's gradient is zero (own process, with a timeout)
  dispatcher      an MoE layer's forward+backward twice: gradients bitwise equal
  compile         eager against torch.compile'd block (the hook issue 14 fills in)
  train           20 steps of train/pretrain.py with a 4-block JetMoE-8B-shaped model: the loss falls, MFU logged
FLOPs follow jetmoe.plan.throughput (causal attention counted as half, Megatron's convention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jetmoe.diagnostics import count_host_syncs  # noqa: E402
from jetmoe.model import JetMoEBlock, JetMoEConfig, MoE, causal_lm_loss, init_like_transformers  # noqa: E402
from jetmoe.model import masking, set_document_mask  # noqa: E402
from jetmoe.model.experts import grouped_linear  # noqa: E402
from jetmoe.plan.memory import block_activation_bytes  # noqa: E402
from jetmoe.plan.params import ModelShape, block_params  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, num_key_value_heads=4, kv_channels=16, intermediate_size=128,
                   num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)


class Env:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.seq = 64 if smoke else 4096
        self.config = (JetMoEConfig.preset("jetmoe_8b", num_hidden_layers=1) if not smoke
                       else JetMoEConfig(num_hidden_layers=1, **SMOKE_MODEL))
        name = self.gpu_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, repeats: int = 3, warmup: int = 1) -> float:
        """Median wall time of fn() in ms (CUDA events on a GPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def blocks(env: Env, n: int, seed: int = 0) -> torch.nn.ModuleList:
    torch.manual_seed(seed)
    with env.device:
        stack = torch.nn.ModuleList(JetMoEBlock(env.config, i) for i in range(n))
    init_like_transformers(stack, env.config.initializer_range)
    for block in stack:
        set_document_mask(block, "off")
    return stack.to(env.dtype)


def block_flops_per_token(env: Env) -> float:
    shape = ModelShape.from_config(env.config)
    b = block_params(shape)
    active = b.dense + b.expert * shape.top_k // shape.num_experts
    return 6 * active + 6 * env.seq * shape.attn_size * shape.top_k  # causal attention: half


def run_stack(stack, x):
    h = x
    for block in stack:
        h = block(h)
    h.float().square().mean().backward()


# -- sections --------------------------------------------------------------------------------------------------

def section_versions(env: Env) -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(env.device),
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "python": sys.version.split()[0], "smoke": env.smoke}
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   peak_bf16_tflops=env.peak)
    print(f"torch {out['torch']} | CUDA {out['cuda']} | cuDNN {out['cudnn']} | {out.get('gpu', 'cpu')}", flush=True)
    return out


def section_stack(env: Env) -> dict:
    layouts = [(2, 1), (2, 2), (4, 1), (4, 2)] if not env.smoke else [(2, 1), (2, 2)]
    shape = ModelShape.from_config(env.config)
    p = torch.tensor([], dtype=env.dtype).element_size()
    rows = []
    for n, mb in layouts:
        stack = blocks(env, n)
        x = torch.randn(mb, env.seq, env.config.hidden_size, device=env.device, dtype=env.dtype, requires_grad=True)
        if env.cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = env.time_ms(lambda: run_stack(stack, x))
        tokens = mb * env.seq
        tflops = tokens * n * block_flops_per_token(env) / (ms / 1e3) / 1e12
        row = dict(blocks=n, micro_batch=mb, ms_per_block_per_micro_batch=ms / n / mb,
                   tokens_per_s=tokens / (ms / 1e3), tflops=tflops, mfu=tflops / env.peak if env.peak else None,
                   planner_activation_mib_per_block=block_activation_bytes(shape, mb, env.seq, p) / 2**20)
        if env.cuda:
            row["peak_mib_per_block"] = (torch.cuda.max_memory_allocated() - base) / n / 2**20
        rows.append(row)
        del stack, x
    # The head + cross-entropy alone (tied head: a V x D matmul, fp32 loss).
    torch.manual_seed(0)
    head = torch.nn.Linear(env.config.hidden_size, env.config.vocab_size, bias=False, device=env.device, dtype=env.dtype)
    h = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, dtype=env.dtype, requires_grad=True)
    labels = torch.randint(0, env.config.vocab_size, (1, env.seq), device=env.device)
    head_ms = env.time_ms(lambda: causal_lm_loss(head(h), labels).backward())
    return {"rows": rows, "head_and_loss_ms_per_micro_batch": head_ms,
            "block_flops_per_token": block_flops_per_token(env)}


BUCKETS = [("grouped_gemm", ("grouped", "_grouped_mm")),
           ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_", "flex")),
           ("matmul", ("gemm", "aten::mm", "aten::bmm", "aten::addmm", "matmul", "cutlass", "xmma", "aten::linear")),
           ("index_sort_scatter", ("index", "sort", "scatter", "gather", "radix", "argsort", "cumsum", "repeat_interleave")),
           ]


def bucket_of(name: str) -> str:
    low = name.lower()
    for bucket, keys in BUCKETS:
        if any(k in low for k in keys):
            return bucket
    return "elementwise_other"


def section_profile(env: Env) -> dict:
    from torch.profiler import ProfilerActivity, profile

    n = 2
    stack = blocks(env, n)
    x = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, dtype=env.dtype, requires_grad=True)
    run_stack(stack, x)  # warm-up
    env.sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if env.cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        run_stack(stack, x)
        env.sync()
    wall_us = (time.perf_counter() - t0) * 1e6
    buckets: dict[str, float] = {}
    if env.cuda:  # device kernels
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        for e in events:
            buckets[bucket_of(e.name)] = buckets.get(bucket_of(e.name), 0.0) + e.device_time_total
    else:  # leaf CPU ops
        for e in prof.key_averages():
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                buckets[bucket_of(e.key)] = buckets.get(bucket_of(e.key), 0.0) + e.self_cpu_time_total
    busy = sum(buckets.values())
    out = {"bucket_ms": {k: v / 1e3 for k, v in sorted(buckets.items())},
           "bucket_share": {k: v / busy for k, v in sorted(buckets.items())} if busy else {},
           "busy_percent": 100 * busy / wall_us if env.cuda else None}
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
        out["cuda_sync_debug_warnings_per_block"] = sum("synchroniz" in str(w.message) for w in caught)
    return out


def section_sdpa(env: Env) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn import functional as F

    c = env.config
    h, k, hd = c.num_key_value_heads, c.num_experts_per_tok, c.kv_channels
    g = torch.Generator(device=env.device).manual_seed(0)
    q = torch.randn(1, h * k, env.seq, hd, device=env.device, dtype=env.dtype, generator=g, requires_grad=True)
    kv = [torch.randn(1, h, env.seq, hd, device=env.device, dtype=env.dtype, generator=g, requires_grad=True)
          for _ in range(2)]
    half = env.seq // 2
    pos = torch.cat([torch.arange(half), torch.arange(env.seq - half)]).to(env.device)[None]
    dense = masking.dense_document_mask(pos)
    out = {"shape": {"q": list(q.shape), "kv": list(kv[0].shape)}}
    backends = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    for mask_name, mask in (("causal", None), ("document_dense", dense)):
        for name, backend in backends.items():
            def step():
                o = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, is_causal=mask is None, enable_gqa=k > 1)
                o.sum().backward()
            try:
                if backend is None:
                    ms = env.time_ms(step)
                else:
                    with sdpa_kernel([backend]):
                        ms = env.time_ms(step)
                out[f"{mask_name}/{name}_ms"] = ms
            except Exception as e:  # a backend that does not take these inputs
                out[f"{mask_name}/{name}_ms"] = f"unsupported: {str(e).splitlines()[0][:160]}"
        try:
            choice = torch._fused_sdp_choice(q, *kv, attn_mask=mask, is_causal=mask is None, enable_gqa=k > 1)
            out[f"{mask_name}/default_picks"] = SDPBackend(choice).name
        except Exception as e:
            out[f"{mask_name}/default_picks"] = f"unknown: {e}"
    if masking.flex_attention is not None:
        flex = masking.flex_document_mask(pos)
        try:
            if env.cuda:
                out["document_flex_ms"] = env.time_ms(
                    lambda: masking.attend(q, *kv, flex, enable_gqa=k > 1).sum().backward())
            else:  # no CPU backward in FlexAttention: forward only
                qd, kd, vd = q.detach(), kv[0].detach(), kv[1].detach()
                out["document_flex_forward_only_ms"] = env.time_ms(
                    lambda: masking.attend(qd, kd, vd, flex, enable_gqa=k > 1))
        except Exception as e:
            out["document_flex_ms"] = f"failed: {str(e).splitlines()[0][:160]}"
    return out


def grouped_gemm_worker(smoke: bool) -> dict:
    """Runs in its own process (a hung kernel must not hang the check)."""
    env = Env(smoke)
    c = env.config
    e, d, f2 = c.num_local_experts, c.hidden_size, 2 * c.intermediate_size
    rows = env.seq * c.num_experts_per_tok
    torch.manual_seed(0)
    w = (torch.randn(e, f2, d, device=env.device, dtype=env.dtype) * 0.02).requires_grad_()
    x = torch.randn(rows, d, device=env.device, dtype=env.dtype, requires_grad=True)
    w_dense = (torch.randn(f2, d, device=env.device, dtype=env.dtype) * 0.02).requires_grad_()
    skew = [rows // 2] + [rows // 2 // (e - 1)] * (e - 1)
    skew[-1] += rows - sum(skew)
    empty = [0] + [rows // (e - 1)] * (e - 1)
    empty[-1] += rows - sum(empty)
    cases = {"balanced": [rows // e] * e, "skewed": skew, "one_empty": empty}
    out = {"shape": {"rows": rows, "in": d, "out": f2, "experts": e}}
    # A dense output gradient: _grouped_mm's backward rejects the stride-0 gradient of a plain .sum() (torch 2.13).
    grad = torch.randn(rows, f2, device=env.device, dtype=env.dtype)
    dense_ms = env.time_ms(lambda: (x @ w_dense.T).backward(grad))
    out["dense_equal_flops_ms"] = dense_ms
    for name, sizes in cases.items():
        counts = torch.tensor(sizes, device=env.device)
        grouped_ms = env.time_ms(lambda: grouped_linear(x, w, counts).backward(grad))
        loop_ms = env.time_ms(lambda: torch.cat([xe @ we.T for xe, we in zip(x.split(sizes), w)]).backward(grad))
        out[name] = {"grouped_ms": grouped_ms, "loop_ms": loop_ms, "grouped_over_dense": grouped_ms / dense_ms}
    w.grad = None
    grouped_linear(x, w, torch.tensor(empty, device=env.device)).backward(grad)
    env.sync()
    out["one_empty"]["empty_expert_grad_is_zero"] = bool((w.grad[0] == 0).all())
    return out


def section_grouped_gemm(env: Env, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--grouped-gemm-worker"] + (["--smoke"] if env.smoke else [])
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s (a grouped GEMM hung)"}
    if run.returncode:
        return {"error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def section_dispatcher(env: Env) -> dict:
    c = env.config
    out = {}
    for deterministic in (False, True):
        from jetmoe.training.determinism import set_deterministic

        set_deterministic(deterministic)
        try:
            grads = []
            for _ in range(2):
                torch.manual_seed(0)
                with env.device:
                    layer = MoE(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok)
                init_like_transformers(layer, 0.02)
                layer.to(env.dtype)
                x = torch.randn(env.seq, c.hidden_size, device=env.device, dtype=env.dtype,
                                generator=torch.Generator(device=env.device).manual_seed(1), requires_grad=True)
                layer(x).float().square().sum().backward()
                grads.append([x.grad] + [p.grad for p in layer.parameters()])
            out["deterministic_mode" if deterministic else "default_mode"] = {
                "bitwise_equal": all(torch.equal(a, b) for a, b in zip(*grads))}
        finally:
            set_deterministic(False)
    return out


def section_compile(env: Env, enabled: bool) -> dict:
    """Hook for issue 14: eager against torch.compile of one block, forward+backward."""
    if not enabled:
        return {"skipped": "pass --compile (on by default on a GPU); issue 14 fills this in"}
    block = blocks(env, 1)
    x = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, dtype=env.dtype, requires_grad=True)
    eager_ms = env.time_ms(lambda: run_stack(block, x))
    compiled = torch.nn.ModuleList([torch.compile(block[0])])
    t0 = time.perf_counter()
    run_stack(compiled, x)
    env.sync()
    compile_s = time.perf_counter() - t0
    compiled_ms = env.time_ms(lambda: run_stack(compiled, x))
    return {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms,
            "compile_s": compile_s}


def section_train(env: Env, timeout_s: float) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="jetmoe_gpu_check_"))
    common = ["train.max_steps=20", "train.eval_every=0", "logging.progress_bar=false", "logging.console=false",
              "logging.wandb.mode=disabled", "logging.router_every=0", "optim.warmup_steps=2", f"hydra.run.dir={run_dir}"]
    if env.smoke:  # fewer steps: the CI budget; most of it is start-up
        common[0] = "train.max_steps=8"
        model = ["model.num_hidden_layers=1", "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2"]
    else:
        model = ["model=jetmoe_8b", "model.num_hidden_layers=4", "data.seq_len=4096", "train.global_batch_size=4",
                 "train.micro_batch_size=1", "train.lr=1e-3", "cluster.gpu=" + ("h200" if "H200" in env.gpu_name else "h100")]
    cmd = [sys.executable, str(ROOT / "train/pretrain.py"), *common, *model]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=environ)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "command": " ".join(cmd)}
    if run.returncode:
        return {"error": (run.stdout + run.stderr)[-3000:], "command": " ".join(cmd)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["lm_loss"], rows[-1]["lm_loss"]
    mfus = [r["mfu"] for r in rows[len(rows) // 2:] if r.get("mfu") is not None]
    return {"steps": len(rows), "first_lm_loss": first, "last_lm_loss": last, "loss_fell": last < first,
            "mfu_second_half": statistics.median(mfus) if mfus else None,
            "tokens_per_sec_last": rows[-1]["tokens_per_sec"], "wall_s": time.perf_counter() - t0,
            "command": " ".join(cmd)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--only", nargs="*", help="run only these sections")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on with a GPU")
    ap.add_argument("--grouped-gemm-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.grouped_gemm_worker:
        print(json.dumps(grouped_gemm_worker(args.smoke)))
        return 0
    env = Env(args.smoke)
    if not env.cuda and not args.smoke:
        print("no GPU: running the CPU smoke version (--smoke)", flush=True)
        env = Env(True)
    compile_on = args.compile == "on" or (args.compile == "auto" and env.cuda)
    sections = {
        "versions": lambda: section_versions(env),
        "stack": lambda: section_stack(env),
        "profile": lambda: section_profile(env),
        "sdpa": lambda: section_sdpa(env),
        "grouped_gemm": lambda: section_grouped_gemm(env, 60 if env.smoke else 120),
        "dispatcher": lambda: section_dispatcher(env),
        "compile": lambda: section_compile(env, compile_on),
        "train": lambda: section_train(env, 120 if env.smoke else 240),
    }
    result, failed = {}, []
    for name, run in sections.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            result[name] = run()
        except Exception:
            result[name] = {"error": traceback.format_exc()[-3000:]}
        if isinstance(result[name], dict) and "error" in result[name]:
            failed.append(name)
        result[name + "_s"] = round(time.perf_counter() - t0, 2)
        print(f"[{name}] {time.perf_counter() - t0:.1f} s{'  FAILED' if name in failed else ''}", flush=True)
        if env.cuda:
            torch.cuda.empty_cache()
    result["failed_sections"] = failed
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
