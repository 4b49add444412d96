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
  compile         eager against train.compile's compiled block (same weights): ms, compile time, no new frames for
                  other expert counts; the last stage's head + loss, full logits against the chunked loss
  train           20 steps of train/pretrain.py with a 4-block JetMoE-8B-shaped model: the loss falls, MFU logged;
                  an async checkpoint at the end (seconds the loop blocked, total), then a launch resuming from it
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
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from gpu_sections import (  # noqa: E402
    Env, block_flops_per_token, blocks, grouped_gemm_worker, run_stack, section_dispatcher, section_grouped_gemm,
    section_sdpa)
from jetmoe.diagnostics import count_host_syncs  # noqa: E402
from jetmoe.model import causal_lm_loss  # noqa: E402
from jetmoe.plan.memory import block_activation_bytes  # noqa: E402
from jetmoe.plan.params import ModelShape, block_params  # noqa: E402

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
                   planner_activation_mib_per_block=block_activation_bytes(shape, mb, env.seq, p) / 2**20,
                   weight_grad_mib_per_block=block_params(shape).total * p / 2**20)
        if env.cuda:  # activations + this block's weight gradients + backward transients
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


def section_compile(env: Env, enabled: bool) -> dict:
    """Eager against train.compile's compiled block (jetmoe.parallel.compile: one graph per block), forward+backward,
    on the same weights and input; then two inputs whose expert counts differ must compile nothing new. Also
    the last stage's head + loss: full fp32 logits against the chunked loss (peak memory and time)."""
    if not enabled:
        return {"skipped": "pass --compile on (on by default on a GPU)"}
    from jetmoe.parallel.compile import compile_blocks, compile_stats

    block = blocks(env, 1)
    compiled = blocks(env, 1)  # same seed: same weights
    compile_blocks(compiled)
    x = torch.randn(1, env.seq, env.config.hidden_size, device=env.device, dtype=env.dtype, requires_grad=True)
    eager_ms = env.time_ms(lambda: run_stack(block, x))
    t0 = time.perf_counter()
    run_stack(compiled, x)
    env.sync()
    compile_s = time.perf_counter() - t0
    frames = compile_stats()["frames"]
    compiled_ms = env.time_ms(lambda: run_stack(compiled, x))
    for seed in (1, 2):  # other tokens, other expert counts
        torch.manual_seed(seed)
        run_stack(compiled, torch.randn_like(x).requires_grad_())
    out = {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "speedup": eager_ms / compiled_ms,
           "compile_s": compile_s, "frames_compiled_after_warmup": compile_stats()["frames"] - frames,
           "graph_breaks": compile_stats()["graph_breaks"]}
    out.update(head_memory(env))
    return out


def head_memory(env: Env) -> dict:
    """The last stage's head + loss at this shape (8B: 2048 x 32000, 4096 tokens): peak memory and time."""
    torch.manual_seed(0)
    d, v = env.config.hidden_size, env.config.vocab_size
    h = torch.randn(env.seq, d, device=env.device, dtype=env.dtype, requires_grad=True)
    w = (torch.randn(v, d, device=env.device) * 0.02).to(env.dtype).requires_grad_()
    labels = torch.randint(0, v, (env.seq,), device=env.device)
    from jetmoe.model import linear_causal_lm_loss

    out = {}
    for name, fn in (("full", lambda: causal_lm_loss(h @ w.T, labels)),
                     ("chunked", lambda: linear_causal_lm_loss(h, w, labels))):
        def step():
            h.grad = w.grad = None
            fn().backward()
        step()
        env.sync()
        if env.cuda:
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        ms = env.time_ms(step, repeats=3, warmup=0)
        out[f"head_{name}_ms"] = ms
        if env.cuda:
            out[f"head_{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


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
    steps = int(common[0].split("=")[1])
    # one asynchronous checkpoint at the last step (bf16 weights, fp32 masters and Adam state from the GPU via
    # pinned buffers), then a second launch resumes from it for one step
    saving = [f"checkpoint.every={steps}", "checkpoint.async=true", "checkpoint.keep=1"]
    cmd = [sys.executable, str(ROOT / "train/pretrain.py"), *common, *model, *saving]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=environ)
        if run.returncode == 0:
            again = [*cmd[:2], *common[1:], f"train.max_steps={steps + 1}", *model, "checkpoint.every=0"]
            resumed = subprocess.run(again, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT, env=environ)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s", "command": " ".join(cmd)}
    if run.returncode:
        return {"error": (run.stdout + run.stderr)[-3000:], "command": " ".join(cmd)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] <= steps]  # without the resumed launch's step
    first, last = rows[0]["lm_loss"], rows[-1]["lm_loss"]
    mfus = [r["mfu"] for r in rows[len(rows) // 2:] if r.get("mfu") is not None]
    out = {"steps": len(rows), "first_lm_loss": first, "last_lm_loss": last, "loss_fell": last < first,
           "mfu_second_half": statistics.median(mfus) if mfus else None,
           "tokens_per_sec_last": rows[-1]["tokens_per_sec"], "wall_s": time.perf_counter() - t0,
           "command": " ".join(cmd)}
    return {**out, **_checkpoint_numbers(run.stdout, resumed)}


def _checkpoint_numbers(saving_log: str, resumed: subprocess.CompletedProcess) -> dict:
    """What the trainer's checkpoint lines say: the async save's blocking and total seconds, its size, and the
    resume's load time and bytes read against the rank's share."""
    import re

    out = {}
    if m := re.search(r"copied to host in ([\d.]+)s", saving_log):
        out["checkpoint_blocking_s"] = float(m.group(1))
    if m := re.search(r"saved step \d+ to \S+ \(([\d.]+) MiB, ([\d.]+)s", saving_log):
        out["checkpoint_mib"], out["checkpoint_save_total_s"] = float(m.group(1)), float(m.group(2))
    if resumed.returncode:
        out["resume_error"] = (resumed.stdout + resumed.stderr)[-3000:]
    elif m := re.search(r"resumed from \S+ at step \d+.*?\(([\d.]+)s, verify=\w+\).*?\(([\d.]+)x\)", resumed.stdout):
        out["resume_load_s"], out["resume_bytes_read_over_share"] = float(m.group(1)), float(m.group(2))
    else:
        out["resume_error"] = "no 'resumed from' line: " + resumed.stdout[-1000:]
    return out


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
