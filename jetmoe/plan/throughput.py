"""FLOPs, communication volume, the 1F1B bubble and the step time they imply."""

from jetmoe.plan.params import ModelShape, ParamCounts


def flops_per_token(shape: ModelShape, counts: ParamCounts, seq: int) -> tuple[int, int]:
    """Training FLOPs per token: (6 x active matmul parameters, attention scores and values).

    Causal attention is counted as half of full attention (Megatron's convention): QK^T and AV are
    2 x 2 x seq x width FLOPs per token forward for full attention, halved for the causal triangle, times 3
    for forward + backward: 6 x layers x seq x (query heads x head dim). For JetMoE-8B at 4096 tokens:
    6 x 2.33e9 active = 13.99 GFLOP plus 2.42 GFLOP of attention = 16.40 GFLOP per token."""
    dense = 6 * counts.flops_params
    attention = 6 * shape.num_layers * seq * shape.attn_size * shape.top_k
    return dense, attention


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle share of a 1F1B step: (pp - 1) warm-up/cool-down slots out of m + pp - 1."""
    return (pp - 1) / (micro_batches + pp - 1)


def micro_batches_for_bubble(pp: int, target: float) -> int:
    """Smallest micro-batch count whose 1F1B bubble is at most `target`."""
    if pp == 1:
        return 1
    m = 1
    while bubble_fraction(pp, m) > target:
        m += 1
    return m


def all_to_all_bytes(
    shape: ModelShape, blocks: int, tokens_per_micro_batch: int, micro_batches: int, ep: int,
    ep_attention: bool, p: int, checkpointing: bool,
) -> int:
    """Bytes one rank sends through expert all-to-alls in a step (uniform routing: (ep-1)/ep of the
    slots leave the rank). MoE: out D, back D. MoA: query projection out D back A, output projection
    out A back D. Backward repeats the volume; checkpointing replays the forward once more."""
    if ep == 1:
        return 0
    per_slot = 2 * shape.hidden_size
    if ep_attention:
        per_slot += 2 * shape.hidden_size + 2 * shape.attn_size
    passes = 3 if checkpointing else 2
    slots = tokens_per_micro_batch * shape.top_k * micro_batches * blocks
    return slots * per_slot * p * passes * (ep - 1) // ep


def pipeline_bytes(shape: ModelShape, tokens_per_micro_batch: int, micro_batches: int, p: int) -> int:
    """Bytes crossing ONE stage boundary of one pipeline in a step: activations forward, gradients back."""
    return 2 * tokens_per_micro_batch * shape.hidden_size * p * micro_batches


def ring_reduce_bytes(param_bytes: int, group: int) -> int:
    """Bytes one rank sends to reduce-scatter gradients and all-gather updated weights over `group`."""
    return 0 if group <= 1 else 2 * param_bytes * (group - 1) // group
