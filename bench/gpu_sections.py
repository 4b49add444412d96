"""Shared set-up of the GPU check (bench/gpu.py) and its kernel-level sections: SDPA backends, grouped GEMM,
the dispatcher's bitwise backward. See bench/gpu.py for what each measures."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetmoe.model import JetMoEBlock, JetMoEConfig, MoE, init_like_transformers  # noqa: E402
from jetmoe.model import masking, set_document_mask  # noqa: E402
from jetmoe.model.experts import grouped_linear  # noqa: E402
from jetmoe.plan.hardware import device_peak_tflops  # noqa: E402
from jetmoe.plan.params import ModelShape, block_params  # noqa: E402

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
        self.peak = device_peak_tflops(name)

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
    init_like_transformers(stack, env.config.initializer_range, seed)
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
        h, _ = block(h)
    h.float().square().mean().backward()


# -- sections --------------------------------------------------------------------------------------------------


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
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--grouped-gemm-worker"] + (["--smoke"] if env.smoke else [])
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s (a grouped GEMM hung)"}
    if run.returncode:
        return {"error": run.stderr[-2000:]}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _grads_twice(make_layer, make_input, loss) -> bool:
    grads = []
    for _ in range(2):
        layer, x = make_layer(), make_input()
        loss(layer, x).backward()
        grads.append([x.grad] + [p.grad for p in layer.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*grads))


def section_dispatcher(env: Env) -> dict:
    """An MoE layer (the dispatcher's gather/permute backward) and a whole block, each run twice, with torch's
    deterministic algorithms off and on: are the gradients bitwise equal?"""
    from jetmoe.training.determinism import set_deterministic

    c = env.config

    def moe():
        torch.manual_seed(0)
        with env.device:
            layer = MoE(c.hidden_size, c.intermediate_size, c.num_local_experts, c.num_experts_per_tok)
        init_like_transformers(layer, 0.02, seed=0)
        return layer.to(env.dtype)

    def rows(*shape):
        g = torch.Generator(device=env.device).manual_seed(1)
        return torch.randn(*shape, c.hidden_size, device=env.device, dtype=env.dtype, generator=g, requires_grad=True)

    out = {}
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
    return out
