"""The GPU check's kernel-level sections (see bench/gpu.py): versions, memory sweeps, grouped GEMM, SDPA and
FlexAttention, the dispatcher's bitwise backward. Each fills `out` as it goes, so a section stopped at its
deadline keeps what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import torch

from gpu_env import ROOT, Env, blocks
from jetmoe.model import MoE, init_like_transformers
from jetmoe.model.experts import grouped_linear, grouped_mm_path


def section_versions(env: Env, out: dict) -> None:
    out.update(torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0], smoke=env.smoke,
               device=str(env.device), torch_pinned_for_users="2.13.0",
               cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        capability = (props.major, props.minor)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   multiprocessors=props.multi_processor_count, peak_bf16_tflops=env.peak,
                   grouped_mm_path_bf16=grouped_mm_path("cuda", torch.bfloat16, capability))
        if env.peak is None:
            out["peak_note"] = f"no peak known for {props.name!r}: MFU left out (pass --peak-tflops)"


def section_memory(env: Env, out: dict, cache_dir) -> None:
    """Bandwidth-bound work of a step, per parameter: what the planner charges for gradient accumulation (per
    micro-batch) and the optimizer (per step, per parameter of the rank's shard); and the disk's write speed."""
    out["disk_write_gbps"] = disk_write_gbps(cache_dir, (1 << 30) if env.cuda else (1 << 24))
    n = (1 << 28) if env.cuda else (1 << 20)  # 256M parameters: sweeps far larger than any cache
    dev = env.device
    lp = torch.randn(n, device=dev).to(torch.bfloat16)
    lp_grad = torch.randn(n, device=dev).to(torch.bfloat16)
    hp = torch.randn(n, device=dev)
    hp_grad = torch.zeros(n, device=dev)
    copy_ms = env.time_ms(lambda: hp_grad.copy_(hp))
    out["hbm_copy_gbps"] = 2 * 4 * n / (copy_ms / 1e3) / 1e9  # read + write
    out["params"] = n

    def accumulate():  # DeepSpeed's BF16_Optimizer, per micro-batch: add the bf16 grads into fp32, zero them
        hp_grad.add_(lp_grad.to(torch.float32))
        torch._foreach_zero_([lp_grad])
    out["grad_accumulation_ns_per_param"] = env.time_ms(accumulate) * 1e6 / n
    hp.grad = hp_grad
    adamw = torch.optim.AdamW([hp], lr=1e-4)
    adamw.step()  # state allocated

    def optimizer():  # AdamW on the fp32 master, then the bf16 working copy refreshed from it
        adamw.step()
        lp.copy_(hp)
    out["optimizer_ns_per_param"] = env.time_ms(optimizer) * 1e6 / n


def disk_write_gbps(folder, size: int) -> float:
    """Sequential write speed into `folder` (written, fsynced, deleted): what a checkpoint's background writer
    gets on this machine's disk."""
    import os
    import tempfile
    import time

    block = os.urandom(1 << 24)
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        t0 = time.perf_counter()
        for _ in range(max(1, size >> 24)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        return max(1, size >> 24) * len(block) / (time.perf_counter() - t0) / 1e9


def grouped_gemm_worker(smoke: bool) -> None:
    """Runs in its own process (a hung kernel must not hang the check); prints one JSON line per result, so the
    parent keeps what came before a timeout."""
    env = Env(smoke)
    c = env.config
    e, d, f2 = c.num_local_experts, c.hidden_size, 2 * c.intermediate_size
    rows = env.seq * c.num_experts_per_tok
    g = torch.Generator(device=env.device).manual_seed(0)
    w = (torch.randn(e, f2, d, device=env.device, generator=g) * 0.02).to(env.dtype).requires_grad_()
    x = torch.randn(rows, d, device=env.device, generator=g).to(env.dtype).requires_grad_()
    w_dense = (torch.randn(f2, d, device=env.device, generator=g) * 0.02).to(env.dtype).requires_grad_()
    # A dense output gradient: _grouped_mm's backward rejects the stride-0 gradient of a plain .sum() (torch 2.13).
    grad = torch.randn(rows, f2, device=env.device, generator=g).to(env.dtype)
    flops = 3 * 2 * rows * d * f2  # forward + both backward matmuls

    def emit(key, value):
        print(json.dumps({key: value}), flush=True)

    emit("shape", {"rows": rows, "in": d, "out": f2, "experts": e, "dtype": str(env.dtype)})
    if env.cuda:
        emit("torch_call_syncs", _grouped_mm_syncs(env))
    dense_ms = env.time_ms(lambda: (x @ w_dense.T).backward(grad))
    emit("dense_equal_flops", {"ms": dense_ms, "tflops": flops / (dense_ms / 1e3) / 1e12})
    skew = [rows // 2 + 1] + [2 * i + 1 for i in range(e - 2)]  # odd sizes, one expert takes half
    skew.append(rows - sum(skew))
    empty = [0] + [rows // (e - 1)] * (e - 1)
    empty[-1] += rows - sum(empty)
    for name, sizes in {"balanced": [rows // e] * e, "skewed_odd": skew, "one_empty": empty}.items():
        emit(name, _grouped_case(env, x, w, grad, sizes, flops, dense_ms))
    emit("fused_fp32_accumulation", _fused_case(env, x, w, grad, empty))


def _fused_case(env: Env, x, w, grad, sizes: list[int]) -> dict:
    """The expert backward that adds its weight gradient into an fp32 sum (model/grouped_mm.py, as the bf16 trainer
    runs it) against the hook path it replaced (bf16 weight gradient, then one add into the fp32 sum): the sum
    against the fp64 product, then both times."""
    from jetmoe.model.grouped_mm import _fp32_out_addmm_works

    counts = torch.tensor(sizes, device=env.device)
    hp = torch.zeros(w.shape, device=env.device)
    exact, start = torch.zeros(w.shape, device=env.device, dtype=torch.float64), 0
    for e, n in enumerate(sizes):
        exact[e] = grad[start:start + n].double().t() @ x.detach()[start:start + n].double()
        start += n

    def fused():
        grouped_linear(x, w, counts).backward(grad)

    def hooks():
        w.grad = None
        grouped_linear(x, w, counts).backward(grad)
        hp.add_(w.grad)

    w.main_grad, w.grad = hp, None
    try:
        fused()
        no_bf16_grad = w.grad is None
        error = float((hp.double() - exact).abs().max() / exact.abs().max())
        fused_ms = env.time_ms(fused)
    finally:
        del w.main_grad
    hooks_ms = env.time_ms(hooks)
    return {"fp32_out_addmm": _fp32_out_addmm_works(x.device), "no_bf16_weight_grad": no_bf16_grad,
            "max_rel_error_vs_fp64": error, "exact_to_fp32": error < 1e-5, "fused_ms": fused_ms, "hooks_ms": hooks_ms,
            "fused_over_hooks": fused_ms / hooks_ms}


def _grouped_case(env: Env, x, w, grad, sizes: list[int], flops: int, dense_ms: float) -> dict:
    """Output and both gradients against the per-expert loop (fp32 accumulation in both: they differ only by
    summation order), then the times; a case that does not match is not timed."""
    counts = torch.tensor(sizes, device=env.device)

    def run(fn):
        x.grad = w.grad = None
        y = fn()
        y.backward(grad)
        return y.detach().float(), x.grad.float(), w.grad.float()

    grouped = run(lambda: grouped_linear(x, w, counts))
    loop = run(lambda: torch.cat([xe @ we.T for xe, we in zip(x.split(sizes), w)]))
    errors = [float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(grouped, loop)]
    tolerance = 2e-2 if env.dtype == torch.bfloat16 else 1e-4
    out = {"sizes": sizes, "max_rel_error_out_dx_dw": errors, "matches_loop": max(errors) <= tolerance,
           "empty_expert_grad_is_zero": bool((w.grad[[i for i, s in enumerate(sizes) if s == 0]] == 0).all())}
    if not out["matches_loop"]:
        out["not_timed"] = f"grouped result differs from the loop by {max(errors):.2e} > {tolerance}"
        return out
    grouped_ms = env.time_ms(lambda: grouped_linear(x, w, counts).backward(grad))
    loop_ms = env.time_ms(lambda: torch.cat([xe @ we.T for xe, we in zip(x.split(sizes), w)]).backward(grad))
    out.update(grouped_ms=grouped_ms, loop_ms=loop_ms, grouped_tflops=flops / (grouped_ms / 1e3) / 1e12,
               grouped_over_dense=grouped_ms / dense_ms)
    return out


def _grouped_mm_syncs(env: Env) -> dict:
    """Does one torch._grouped_mm call wait for the host here (torch's per-group fallback copies the offsets to
    the host)? jetmoe takes the grouped path only where it does not."""
    x = torch.zeros(32, 64, device=env.device, dtype=torch.bfloat16)
    w = torch.zeros(2, 64, 64, device=env.device, dtype=torch.bfloat16)
    offs = torch.tensor([16, 32], device=env.device, dtype=torch.int32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch._grouped_mm(x, w.transpose(1, 2), offs=offs)
        syncs = False
    except RuntimeError as e:
        syncs = "synchroniz" in str(e).lower() or str(e).splitlines()[0][:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    capability = torch.cuda.get_device_capability()
    return {"bf16_call_syncs": syncs, "jetmoe_path": grouped_mm_path("cuda", torch.bfloat16, capability),
            "jetmoe_path_agrees": (syncs is False) == (grouped_mm_path("cuda", torch.bfloat16, capability) == "grouped")}


def section_grouped_gemm(env: Env, out: dict, deadline) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--grouped-gemm-worker"] + (["--smoke"] if env.smoke else [])
    timeout = max(1.0, deadline.left() - 2)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        stdout, failed = run.stdout, run.returncode != 0 and run.stderr[-2000:]
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        failed = None
        out["out_of_time"] = f"the worker ran past {timeout:.0f} s (a hung kernel?); results before it stand"
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    if failed:
        out["error"] = failed


def section_sdpa(env: Env, out: dict) -> None:
    from torch.nn import functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = env.config
    h, k, hd = c.num_key_value_heads, c.num_experts_per_tok, c.kv_channels
    g = torch.Generator(device=env.device).manual_seed(0)
    q = torch.randn(1, h * k, env.seq, hd, device=env.device, generator=g).to(env.dtype).requires_grad_()
    kv = [torch.randn(1, h, env.seq, hd, device=env.device, generator=g).to(env.dtype).requires_grad_()
          for _ in range(2)]
    doc = (torch.arange(env.seq, device=env.device) >= env.seq // 2).long()[None]  # two documents
    dense = ((doc[:, :, None] == doc[:, None, :])
             & torch.ones(env.seq, env.seq, dtype=torch.bool, device=env.device).tril())[:, None]
    # forward + backward of causal attention: 3 x (QK^T + PV), half of the full square
    flops = 3 * 2 * 2 * (h * k) * env.seq * env.seq * hd / 2
    out["shape"] = {"q": list(q.shape), "kv": list(kv[0].shape)}
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
                out[f"{mask_name}/{name}_tflops"] = flops / (ms / 1e3) / 1e12
            except Exception as e:  # a backend that does not take these inputs
                out[f"{mask_name}/{name}_ms"] = f"unsupported: {str(e).splitlines()[0][:160]}"
    out.update(_flex(env, q, kv, doc, flops, k > 1))


def _flex(env: Env, q, kv, doc, flops: float, gqa: bool) -> dict:
    """FlexAttention with a document block mask, compiled (eager FlexAttention is an unfused reference). A
    failure is reported as a failure: the model would fall back to a dense SDPA mask, which is timed above."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return {"flex": f"unavailable: {e}"}

    def same_document_causal(b, h, qi, ki):
        return (doc[b, qi] == doc[b, ki]) & (qi >= ki)

    try:
        block = create_block_mask(same_document_causal, 1, None, env.seq, env.seq, device=env.device)
        if not env.cuda:  # no CPU backward in FlexAttention: the forward, eager (it warns that it is unfused)
            qd, kd, vd = q.detach(), kv[0].detach(), kv[1].detach()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ms = env.time_ms(lambda: flex_attention(qd, kd, vd, block_mask=block, enable_gqa=gqa))
            return {"flex": "ran (forward only, eager, CPU)", "document_flex_forward_ms": ms}
        compiled = torch.compile(flex_attention, dynamic=False)
        ms = env.time_ms(lambda: compiled(q, *kv, block_mask=block, enable_gqa=gqa).sum().backward())
        # half the causal square is masked out again by the two documents
        return {"flex": "ran (compiled)", "document_flex_ms": ms, "document_flex_tflops": flops / 2 / (ms / 1e3) / 1e12}
    except Exception as e:
        return {"flex": f"failed, the model would fall back to dense masks: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}"}


def _grads_twice(make_layer, make_input, loss) -> bool:
    grads = []
    for _ in range(2):
        layer, x = make_layer(), make_input()
        loss(layer, x).backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def section_dispatcher(env: Env, out: dict) -> None:
    """An MoE layer (the dispatcher's gather/permute backward) and a whole block, each run twice, with torch's
    deterministic algorithms off and on: are the gradients bitwise equal?"""
    from jetmoe.training.determinism import set_deterministic

    c = env.config

    def moe():
        with torch.device("meta"):
            layer = MoE(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok)
        layer = layer.to(env.dtype).to_empty(device=env.device)
        init_like_transformers(layer, 0.02, seed=0)
        return layer

    def rows(*shape):
        g = torch.Generator(device=env.device).manual_seed(1)
        x = torch.randn(*shape, c.hidden_size, device=env.device, generator=g)
        return x.to(env.dtype).requires_grad_()

    for deterministic in (False, True):
        set_deterministic(deterministic)
        key = "deterministic_mode" if deterministic else "default_mode"
        try:
            out[key] = {
                "moe_layer_bitwise_equal": _grads_twice(moe, lambda: rows(env.seq),
                                                        lambda m, x: m(x)[0].float().square().sum()),
                "block_bitwise_equal": _grads_twice(lambda: blocks(env, 1), lambda: rows(1, env.seq),
                                                    lambda m, x: m[0](x)[0].float().square().sum())}
        except Exception as e:  # an op without a deterministic implementation raises under deterministic mode
            out[key] = {"error_text": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        finally:
            set_deterministic(False)
