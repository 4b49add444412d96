"""What the training engine does, as the named inputs of the planner's step-cost model.

Each value states one behaviour of jetmoe/training/engine.py on DeepSpeed 0.19.8 (read in its source; where is
said beside the value). `TODAY` is the engine as it is. A change to the engine (issue 22's cuts) changes one
value here and the planner's breakdown follows; `train/plan.py` prints these values under "engine".
"""

from dataclasses import dataclass, fields, replace

ALL_REDUCE, REDUCE_SCATTER = "all_reduce", "reduce_scatter"
AFTER_STEP, AFTER_LAST_BACKWARD, DURING_LAST_BACKWARD = "after_step", "after_last_backward", "during_last_backward"


@dataclass(frozen=True)
class EngineBehaviour:
    # bf16 runs (BF16_Optimizer, fp32 accumulation): HBM bytes per parameter per micro-batch outside the model's own
    # backward kernels. With bf16.immediate_grad_update and jetmoe's one-pass add (parallel/deepspeed_internals.py
    # add_bf16_grads_without_temporary), each gradient hook adds the fresh bf16 gradient into the fp32 sum with the
    # promotion per element (read 2 + 4, write 4) and frees it: 10. DeepSpeed's default (BEFORE_ISSUE_22): 26.
    grad_accumulation_bytes_per_param: float = 10.0
    # The grouped expert weights (MoA and MoE experts: ~95% of a JetMoE-8B stage) in bf16 runs: their backward's
    # weight-gradient GEMM adds into the fp32 sum itself (model/grouped_mm.py, C += A @ B with an fp32 C; Megatron's
    # gradient_accumulation_fusion), so no bf16 gradient is written (2) and no hook reads it back: the GEMM's
    # epilogue reads and writes the fp32 sum instead (4 + 4). 6 bytes more than the plain GEMM, all counted as
    # exposed. None: these weights go through the hook like the others (grad_accumulation_bytes_per_param).
    expert_grad_accumulation_bytes_per_param: float | None = 6.0
    # fp32 runs (ZeRO-1 optimizer): autograd's in-place add into the fp32 .grad (read 4 + 4, write 4).
    fp32_grad_accumulation_bytes_per_param: float = 12.0
    # The gradient reduction over data parallelism, after the last micro-batch (pipe/engine.py _exec_reduce_grads ->
    # engine.py buffered_allreduce_fallback): dense gradients over dp, expert gradients over the expert-data group.
    dp_reduce_op: str = ALL_REDUCE  # all_reduce (every rank gets the whole sum) | reduce_scatter (its shard only)
    # communication_data_type fp32 (engine.py: allreduce_bucket casts to it). Buckets hold 5e8 elements
    # (MEMORY_OPT_ALLREDUCE_SIZE): a param group's flat buffer larger than that (the 8B's) is reduced in place; smaller
    # groups are flattened into a bucket and copied back (16 B/param per step of HBM traffic, not counted here).
    dp_reduce_bytes: int = 4
    # after_step: every stage waits for the schedule's end (the tied reduction first joins the first and last stage);
    # after_last_backward: a stage starts when its own last backward ends (stage s, s backward passes before stage 0);
    # during_last_backward: also overlapped with that last backward, bucket by bucket as gradients become final.
    dp_reduce_starts: str = AFTER_STEP
    # ZeRO-1: each rank steps its shard, then all-gathers the updated working weights (bf16_optimizer.py
    # update_lp_params -> all_gather_into_tensor over the same groups); fp32 runs gather fp32 weights.
    weight_gather_bytes: int = 2
    # Tied embedding: the first and the last stage all-reduce its gradient (pipe/engine.py _exec_reduce_tied_grads,
    # the fp32 _hp_grad in bf16 runs) before the dp reduction, so the last stage waits for the first's last backward.
    tied_reduce_bytes: int = 4
    # BF16_Optimizer.step sweeps the whole stage's fp32 gradient, not only this rank's shard: the norm reads it (4),
    # clipping reads and writes it (8; runtime/utils.py clip_tensors_by_global_norm, counted as if the norm always
    # exceeds optim.grad_clip), clear_hp_grads zeroes it (4). AdamW itself runs on the shard only.
    optimizer_full_sweep_bytes_per_param: float = 16.0
    # What parallel.partition=parameters balances (parallel/pipeline.py block_weights): "parameters" or "flops".
    partition_balances: str = "parameters"
    # The last stage's head runs inside the chunked loss (model/loss.py HEAD_CHUNK_TOKENS), whose forward keeps the
    # fp32 gradient with respect to the logits: backward multiplies it back (6 x V x D FLOPs per token). Before issue
    # 22 it kept nothing and computed the logits again in backward (8 x V x D).
    head_chunk_tokens: int = 1024
    head_recomputes_logits: bool = False
    # Host time per micro-batch that the device waits for (the engine's Python between kernels). Not measured on a
    # GPU: 0 means the device stays ahead, as the H200 stage run suggests (its step is predicted without it).
    engine_overhead_s_per_micro_batch: float = 0.0
    # The fused expert backward (expert_grad_accumulation_bytes_per_param) fetches its rows per expert to the host:
    # one sync per projection, 4 per block (MoA and MoE, input and output), each leaving the device idle from the
    # end of its queue to the next launch. 20 us each is stated, not measured (bench/gpu.py's training section
    # measures the step it is part of); 0 for runs without the fusion.
    fused_backward_syncs_per_block: int = 4
    host_sync_idle_s: float = 20e-6

    def rows(self) -> list[tuple[str, str]]:
        """(name, value) of every behaviour, for the report."""
        return [(f.name, str(getattr(self, f.name))) for f in fields(self)]


TODAY = EngineBehaviour()
# The engine before issue 22's cuts: bf16_optimizer.py's clear_lp_grads zeroes the bf16 grads (write 2); autograd
# adds the weight gradient into the zeroed .grad in place (read 2 + 2, write 2); update_hp_grads'
# hp.add_(lp.grad.to(fp32)) casts into a temporary (read 2, write 4) and adds it (read 4 + 4, write 4).
BEFORE_ISSUE_22 = replace(TODAY, grad_accumulation_bytes_per_param=26.0, expert_grad_accumulation_bytes_per_param=None,
                          fused_backward_syncs_per_block=0, head_recomputes_logits=True)
