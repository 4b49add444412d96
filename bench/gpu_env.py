"""What every section of the GPU check (bench/gpu.py) shares: the device, the 8B shapes, timing, peak TFLOP/s, and
JetMoE-8B blocks built on the device."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetmoe.model import JetMoEBlock, JetMoEConfig, init_like_transformers, set_document_mask  # noqa: E402
from jetmoe.plan.hardware import PEAK_TFLOPS as PEAK_BF16_TFLOPS  # noqa: E402, F401 (the one table, by exact name)
from jetmoe.plan.hardware import device_peak_tflops  # noqa: E402
from jetmoe.plan.params import ModelShape, block_params  # noqa: E402

SMOKE_MODEL = dict(vocab_size=512, hidden_size=64, num_key_value_heads=4, kv_channels=16, intermediate_size=128,
                   num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256)


def peak_bf16_tflops(device_name: str) -> float | None:
    return device_peak_tflops(device_name.strip())


class Env:
    def __init__(self, smoke: bool, peak_tflops: float | None = None):
        self.smoke = smoke
        self.cuda = torch.cuda.is_available() and not smoke
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.seq = 64 if smoke else 4096
        self.config = (JetMoEConfig.preset("jetmoe_8b", num_hidden_layers=1) if not smoke
                       else JetMoEConfig(num_hidden_layers=1, **SMOKE_MODEL))
        self.gpu_name = torch.cuda.get_device_name() if self.cuda else "cpu"
        self.peak = peak_tflops or (peak_bf16_tflops(self.gpu_name) if self.cuda else None)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn, repeats: int = 3, warmup: int = 1) -> float:
        """Median time of fn() in ms (CUDA events on a GPU, wall time on the CPU)."""
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

    def memory_base(self) -> int:
        """Start a peak-memory window; returns the bytes allocated now (0 on the CPU)."""
        if not self.cuda:
            return 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def peak_mib_since(self, base: int) -> float | None:
        return (torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else None


def blocks(env: Env, n: int, seed: int = 0) -> torch.nn.ModuleList:
    """n JetMoE-8B blocks (transformers' init), built directly on the device in the check's dtype."""
    with torch.device("meta"):
        stack = torch.nn.ModuleList(JetMoEBlock(env.config, i) for i in range(n))
    stack = stack.to(env.dtype).to_empty(device=env.device)
    with torch.no_grad():
        init_like_transformers(stack, env.config.initializer_range, seed)
    for block in stack:
        set_document_mask(block, "off")
    return stack


def block_flops_per_token(env: Env) -> float:
    """One block's training FLOPs per token: 6 x active matmul parameters + causal attention (half of full)."""
    shape = ModelShape.from_config(env.config)
    b = block_params(shape)
    active = b.dense + b.expert * shape.top_k // shape.num_experts
    return 6 * active + 6 * env.seq * shape.attn_size * shape.top_k


def run_stack(stack, x):
    h = x
    for block in stack:
        h, _ = block(h)
    h.float().square().mean().backward()
