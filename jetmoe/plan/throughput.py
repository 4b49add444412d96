"""FLOPs per token (the MFU convention) and the 1F1B bubble."""

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
