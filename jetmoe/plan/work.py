"""The work one micro-batch gives a pipeline stage, by kind, and the seconds a GPU needs for it.

Matmuls are counted in FLOPs of three kinds, each timed at its own measured rate (hardware.Efficiencies): dense
GEMMs (kv projection, routers, the head), grouped expert GEMMs (MoA query/output and MoE experts) and causal
attention (counted as half of full attention, the convention bench/gpu.py's SDPA rate uses too). Everything
else a step does on the device is memory-bound and counted in HBM bytes, timed at the measured copy rate.

Bytes per token of one block's forward, as the compiled block moves them outside its GEMM and attention kernels
(p = bytes of the compute dtype; D hidden, A = query width of one attention expert, F intermediate, k = top_k;
Inductor fuses each run of pointwise ops into one kernel that reads its inputs and writes its outputs once):
  two RMSNorms            read and write D each                                         2 x 2pD
  two routers             the fp32 copy of the input their fp32 matmul reads             2 x (p + 4)D
  MoA                     slots gathered for the query experts 2kpD, queries put back in token order 2kpA,
                          to heads with rotary 2kpA, rotary keys 2pA, attention output to slots 2kpA,
                          gathered for the output experts 2kpA, put back 2kpD
  MoE                     slots gathered 2kpD, SwiGLU reads 2kF and writes kF (3kpF), put back 2kpD
  two slot sums           the fp32 weighted sum: k slots cast to fp32 and read, result cast back
                                                                                  2 x (kpD + 8kD + 8D + pD)
  two residual adds       bias, branch and stream read, stream written                   2 x 3pD
  expert parallelism      one more permutation of every dispatched and combined row: 2kp(4D + 2A) (MoE
                          only: 2kp x 2D)
The backward moves about twice the forward's bytes (each op reads its output's gradient and what it saved,
and writes its input's gradient); recompute (activation checkpointing) runs the forward once more.
"""

from dataclasses import dataclass
from math import ceil

from jetmoe.plan.engine_model import EngineBehaviour
from jetmoe.plan.hardware import Efficiencies
from jetmoe.plan.params import ModelShape, ParamCounts

BACKWARD_BYTES_PER_FORWARD_BYTE = 2


@dataclass(frozen=True)
class Work:
    """FLOPs by kind and memory-bound bytes; adds up across blocks and micro-batches."""

    dense_flops: float = 0.0
    grouped_flops: float = 0.0
    attention_flops: float = 0.0
    hbm_bytes: float = 0.0

    def __add__(self, other: "Work") -> "Work":
        return Work(self.dense_flops + other.dense_flops, self.grouped_flops + other.grouped_flops,
                    self.attention_flops + other.attention_flops, self.hbm_bytes + other.hbm_bytes)

    def __mul__(self, n: float) -> "Work":
        return Work(self.dense_flops * n, self.grouped_flops * n, self.attention_flops * n, self.hbm_bytes * n)

    def seconds(self, eff: Efficiencies) -> float:
        return (self.dense_flops / (eff.dense_gemm_tflops * 1e12) + self.grouped_flops / (eff.grouped_gemm_tflops * 1e12)
                + self.attention_flops / (eff.attention_tflops * 1e12) + self.hbm_bytes / (eff.hbm_gbps * 1e9))

    @property
    def flops(self) -> float:
        return self.dense_flops + self.grouped_flops + self.attention_flops


def block_forward_bytes(shape: ModelShape, p: int, ep: int = 1, ep_attention: bool = True) -> float:
    """HBM bytes per token of one block's forward outside its matmuls (the table in the module docstring)."""
    D, A, F, k = shape.hidden_size, shape.attn_size, shape.intermediate_size, shape.top_k
    fp32_copy = p + 4 if p != 4 else 0
    norms = 2 * 2 * p * D
    routers = 2 * fp32_copy * D
    moa = 2 * k * p * D + 2 * k * p * A + 2 * k * p * A + 2 * p * A + 2 * k * p * A + 2 * k * p * A + 2 * k * p * D
    moe = 2 * k * p * D + 3 * k * p * F + 2 * k * p * D
    slot_sums = 2 * (k * p * D + 8 * k * D + 8 * D + p * D)
    residuals = 2 * 3 * p * D
    expert_parallel = 0
    if ep > 1:
        expert_parallel = 2 * k * p * ((4 * D + 2 * A) if ep_attention else 2 * D)
    return norms + routers + moa + moe + slot_sums + residuals + expert_parallel


def block_work(shape: ModelShape, seq: int, p: int, recompute: bool, ep: int = 1, ep_attention: bool = True) -> Work:
    """One block, per token, forward + backward (+ the forward again under activation checkpointing)."""
    D, A, F, E, k = shape.hidden_size, shape.attn_size, shape.intermediate_size, shape.num_experts, shape.top_k
    passes = (3 + (1 if recompute else 0)) / 3  # a forward is a third of forward + backward's matmul FLOPs
    dense = 6 * (D * 2 * A + 2 * D * E)  # kv projection, two routers
    grouped = 6 * k * (2 * A * D + 3 * F * D)  # MoA query + output experts, MoE fc1 (2F) + fc2
    attention = 6 * seq * A * k  # causal, half of full attention
    forward_bytes = block_forward_bytes(shape, p, ep, ep_attention)
    hbm = forward_bytes * (1 + BACKWARD_BYTES_PER_FORWARD_BYTE + (1 if recompute else 0))
    return Work(dense * passes, grouped * passes, attention * passes, hbm)


def head_work(shape: ModelShape, tokens: int, p: int, engine: EngineBehaviour) -> Work:
    """The last stage's final norm, tied/untied head and chunked cross-entropy on one micro-batch of `tokens`.

    With `engine.head_recomputes_logits` the chunked loss computes each chunk's logits again in backward (8 x V x D
    FLOPs per token); otherwise forward keeps the fp32 softmax - onehot and backward only multiplies (6 x V x D).
    Bytes per token and vocabulary entry: forward writes the logits (p), casts them (p + 4), takes their
    logsumexp (4), and (kept) turns them into the gradient in place (exp, onehot, mask: 24); backward scales and
    casts it (8 + 4 + p) and reads it into both products (2p): 5p + 44. Recomputing instead: 3p + 32 and, per
    chunk, an fp32 add of the weight gradient's partial product."""
    V, D = shape.vocab_size, shape.hidden_size
    per_norm = 3 * 2 * p * D  # the final norm, forward and backward
    if engine.head_recomputes_logits:
        chunks = ceil(tokens / engine.head_chunk_tokens)
        weight_grad = V * D * (4 + chunks * (p + 16) + 4 + p)
        return Work(dense_flops=8 * V * D * tokens, hbm_bytes=((3 * p + 32) * V + per_norm) * tokens + weight_grad)
    return Work(dense_flops=6 * V * D * tokens, hbm_bytes=((5 * p + 44) * V + per_norm) * tokens + V * D * p)


def embedding_work(shape: ModelShape, tokens: int, p: int) -> Work:
    """The first stage's lookup (write a row per token, read it back in backward) and its dense V x D gradient."""
    return Work(hbm_bytes=3 * p * shape.hidden_size * tokens + 2 * p * shape.vocab_size * shape.hidden_size)


def stage_work(shape: ModelShape, blocks: int, first: bool, last: bool, tokens: int, seq: int, p: int,
               recompute: bool, engine: EngineBehaviour, ep: int = 1, ep_attention: bool = True) -> Work:
    """One micro-batch of `tokens` through one stage, forward and backward."""
    work = block_work(shape, seq, p, recompute, ep, ep_attention) * (blocks * tokens)
    if first:
        work = work + embedding_work(shape, tokens, p)
    if last:
        work = work + head_work(shape, tokens, p, engine)
    return work


def counted_flops(shape: ModelShape, counts: ParamCounts, blocks: int, last: bool, tokens: int, seq: int) -> float:
    """The stage's share of the MFU convention's FLOPs (throughput.flops_per_token: 6 x active matmul parameters +
    causal attention; the head once, as 6 x V x D) for a micro-batch of `tokens`."""
    b = counts.block
    per_block = 6 * (b.dense + b.expert * shape.top_k // shape.num_experts) + 6 * seq * shape.attn_size * shape.top_k
    head = 6 * (counts.embedding + counts.final_norm) if last else 0  # tied or not, the head counts once
    return (blocks * per_block + head) * tokens
