"""Memory of one rank: weights, gradients, ZeRO-1 optimizer shards, activations in flight under 1F1B.

Peak = weights + optimizer shard + the largest of
  - n activations in flight (before a step's first backward: the last step freed the gradients),
  - gradients + n' activations (n' = n when a forward follows that backward, else n - 1),
  - gradients + the optimizer step's temporaries (activations are gone by then),
with pipeline buffers and backward temporaries on top of the first two.

Activations are what autograd keeps for backward. Per block and token, for jetmoe/model's forward
(p = bytes of the compute dtype; D hidden, A = kv heads x kv_channels, k = top_k, F = intermediate,
E = experts, hd = kv_channels):
  each RMSNorm        its input upcast to fp32 (4D), the normalized value (pD), its output (pD)
  MoA                 slot inputs k*D, roped queries k*A, k and v 2A, roped keys A, attention output k*A,
                      its slot copy k*A, expert outputs k*D (all p); log-sum-exp per query head (fp32)
  MoE                 slot inputs k*D, fc1 output 2k*F (the fused SwiGLU recomputes silu from it),
                      its product k*F, expert outputs k*D
  each router         logits and probabilities 2E (fp32), z-loss logsumexp (fp32), gates k (fp32 + p)
  index vectors       7k int64 (expert ids, dispatch/combine permutations)
  RoPE                cos and sin, 2*hd (p)
Rotary multiplications keep only cos/sin, and gathers keep only their indices, so neither adds more.
The fused attention kernel keeps no seq x seq matrix; the eager kernel would (eager_attention=True).
With activation checkpointing a block keeps only its input (D per token) and recomputes the rest
while its backward runs, so one block's full set is alive at a time on top.
"""

from dataclasses import dataclass

from jetmoe.plan.params import ModelShape

GIB = 1024**3


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter and per activation element, as the engine's optimizer holds them: DeepSpeed's
    ZeRO-1 optimizer in fp32; in bf16 its BF16_Optimizer (jetmoe/training/engine.py asks for fp32 gradient
    accumulation), which keeps a full fp32 gradient buffer beside each micro-batch's bf16 gradients."""

    param_bytes: int = 2  # weights: bf16
    grad_bytes: int = 6  # full (unpartitioned) gradients: the fp32 sum over micro-batches + one bf16 micro-batch's
    act_bytes: int = 2
    optimizer_bytes: int = 12  # per parameter of this rank's ZeRO-1 shard: fp32 master copy, Adam m and v
    adam_temporaries: int = 1  # shard-sized fp32 temporaries inside AdamW's step: 1 (foreach, GPU), 2 (CPU)

    @classmethod
    def named(cls, name: str) -> "Precision":
        return cls(4, 4, 4) if name in ("fp32", "float32") else cls(2, 6, 2)

    @property
    def step_bytes(self) -> int:
        """Per shard parameter, alive only during the optimizer step: AdamW's temporaries, and in fp32 the
        flattened fp32 gradient shard ZeRO-1 builds (the BF16_Optimizer steps on a view of its fp32 buffer)."""
        flat_grad_shard = 4 if self.param_bytes == 4 else 0
        return flat_grad_shard + 4 * self.adam_temporaries


def block_activation_bytes(shape: ModelShape, batch: int, seq: int, p: int, eager_attention: bool = False,
                           document_mask: bool = False) -> int:
    """Bytes autograd keeps for one block's backward on one micro-batch, without checkpointing.
    With data.document_mask the attention kernel also keeps the seq x seq mask as an additive bias."""
    D, A, F, E, k = shape.hidden_size, shape.attn_size, shape.intermediate_size, shape.num_experts, shape.top_k
    heads, hd = shape.num_kv_heads * k, shape.kv_channels
    norms = 2 * (4 * D + 2 * p * D)
    moa = p * (2 * k * D + 3 * k * A + 3 * A) + 4 * heads
    moe = p * (2 * k * D + 3 * k * F)
    routers = 2 * (2 * E * 4 + 4 + k * 4 + (k * p if p != 4 else 0))
    per_token = norms + moa + moe + routers + 7 * k * 8 + 2 * hd * p
    total = batch * seq * per_token
    if eager_attention:
        total += batch * heads * seq * seq * p
    if document_mask:
        total += batch * seq * seq * p
    return total


def block_backward_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """Gradients alive at once inside one block's backward, on top of what was saved: the MoE's
    fc1-output gradient (2k*F) and its SwiGLU-output gradient (k*F) per token."""
    return batch * seq * 3 * shape.top_k * shape.intermediate_size * p


def loss_backward_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """The cross-entropy's fp32 gradient of the logits (plus its cast to the compute dtype)."""
    return batch * seq * shape.vocab_size * (4 + (p if p != 4 else 0))


def checkpointed_block_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    return batch * seq * shape.hidden_size * p


def head_activation_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """The last stage's final norm (fp32 input, normalized, output) and the fp32 log-softmax that the
    cross-entropy keeps (the logits themselves are not kept)."""
    D = shape.hidden_size
    return batch * seq * (4 * D + 2 * p * D + 4 * shape.vocab_size)


def stage_io_bytes(shape: ModelShape, batch: int, seq: int, p: int) -> int:
    """A pipeline buffer: the hidden states a stage receives (or sends) for one micro-batch."""
    return batch * seq * shape.hidden_size * p


def in_flight(stage: int, pp: int, micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at once under 1F1B: stage s runs pp - s forwards
    before its first backward."""
    return min(pp - stage, micro_batches)


def pipe_buffers(stage: int, pp: int, micro_batches: int) -> int:
    """DeepSpeed's pipeline buffers on a stage (each keeps a micro-batch's input and output hidden states)."""
    return max(2, in_flight(stage, pp, micro_batches)) if pp > 1 else 0


@dataclass(frozen=True)
class StageMemory:
    stage: int
    weights: int
    grads: int
    optimizer: int
    act_per_micro_batch: int  # with the configured checkpointing
    act_per_micro_batch_full: int
    act_per_micro_batch_ckpt: int
    in_flight: int
    buffers: int  # pipeline send/receive buffers
    transient: int  # alive only inside one block's backward / the loss
    step: int  # alive only inside the optimizer step (activations are gone by then)
    peak: int


def stage_memory(
    shape: ModelShape,
    stage: int,
    pp: int,
    blocks: int,
    dense_params: int,
    expert_params: int,
    dp: int,
    expert_dp: int,
    batch: int,
    seq: int,
    micro_batches: int,
    prec: Precision,
    checkpointing: bool,
    eager_attention: bool = False,
    document_mask: bool = False,
) -> StageMemory:
    p = prec.act_bytes
    params = dense_params + expert_params
    weights = params * prec.param_bytes
    grads = params * prec.grad_bytes
    shard = -(-dense_params // dp) + -(-expert_params // expert_dp)
    optimizer = prec.optimizer_bytes * shard
    step = prec.step_bytes * shard
    full_block = block_activation_bytes(shape, batch, seq, p, eager_attention, document_mask)
    ckpt_block = checkpointed_block_bytes(shape, batch, seq, p)
    last = stage == pp - 1
    head = head_activation_bytes(shape, batch, seq, p) if last else 0
    full = blocks * full_block + head
    ckpt = blocks * ckpt_block + head
    n = in_flight(stage, pp, micro_batches)
    # after the first backward of a step the gradients exist; 1F1B then still holds n micro-batches if
    # a forward follows (steady state), else n - 1 (cool-down)
    n_with_grads = n if micro_batches > n else n - 1
    buffers = pipe_buffers(stage, pp, micro_batches) * 2 * stage_io_bytes(shape, batch, seq, p)
    # inside backward: one block's (or the loss's) gradients, and with checkpointing the block being recomputed
    working = max(block_backward_bytes(shape, batch, seq, p) if blocks else 0,
                  loss_backward_bytes(shape, batch, seq, p) if last else 0)
    transient = working + (full_block if checkpointing and blocks else 0)
    act = ckpt if checkpointing else full
    backward = max(n * act, grads + n_with_grads * act) + buffers + transient
    peak = weights + optimizer + max(backward, grads + step)
    return StageMemory(stage, weights, grads, optimizer, act, full, ckpt, n, buffers, transient, step, peak)
