"""Every use of a private DeepSpeed name, in one place.

DeepSpeed's internals change between releases; `pyproject.toml` pins the range these were checked on,
and tests/test_deepspeed_internals.py fails with the name and the range when one of them moves. Each is
needed for a reason that its docstring gives; nothing else in jetmoe touches an underscored DeepSpeed name.
"""

from __future__ import annotations

import contextlib

import torch

TESTED_RANGE = ">=0.19.8,<0.20"  # keep in step with pyproject.toml's deepspeed pin

# (module, class or None, name) of every private name used below; checked by missing_private_names().
PRIVATE_NAMES = (
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_partition_layers"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_set_bounds"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_synchronize_tied_weights"),
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_layer_specs"),  # set in __init__
    ("deepspeed.runtime.pipe.module", "PipelineModule", "_topo"),  # set in __init__
    ("deepspeed.utils.groups", None, "_create_expert_and_data_parallel"),
    ("deepspeed.utils.groups", None, "_get_expert_parallel_group"),
    ("deepspeed.utils.groups", None, "_get_expert_parallel_group_dict"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", "_configure_distributed_model"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_hp_optimizer_states_linked"),  # set in __init__
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_hp_optimizer_states_linked"),  # set in __init__
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_update_hp_grad"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "fp32_groups_gradients"),  # set in __init__
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "fp32_groups_has_gradients"),  # set in __init__
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "bf16_groups"),  # set in __init__
    # Not underscored, but internal: the training-loss accumulator that eval_batch also adds outputs to.
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "total_loss"),  # set in __init__
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", "_global_grad_norm"),  # set in step
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", "_global_grad_norm"),  # set in step
    ("deepspeed.runtime.pipe.engine", "PipelineEngine", "_INSTRUCTION_MAP"),
)


def missing_private_names() -> list[str]:
    """The private names that the installed DeepSpeed lacks (empty when all are there). A name that
    DeepSpeed sets on the instance counts as present when the class's own source assigns it."""
    import importlib
    import inspect

    missing = []
    for module_name, cls_name, name in PRIVATE_NAMES:
        owner = importlib.import_module(module_name)
        if cls_name is not None:
            owner = getattr(owner, cls_name, None)
        present = owner is not None and (
            hasattr(owner, name) or (inspect.isclass(owner) and f"self.{name} =" in inspect.getsource(owner)))
        if not present:
            missing.append(f"{module_name}.{cls_name + '.' if cls_name else ''}{name}")
    return missing


# ------------------------------------------------------------------------------------------- pipeline
def _pipeline_module_class():
    from deepspeed.runtime.pipe.module import PipelineModule

    class BlockCountPipelineModule(PipelineModule):
        """A PipelineModule whose stage boundaries are given as blocks per stage.

        DeepSpeed's own partition methods count layers, not blocks: the first stage must also hold the
        embedding and the last the norm and head, whatever the split. `_partition_layers` is the only
        hook that decides the boundaries before the stage's layers are built.
        """

        def __init__(self, block_counts: list[int], **kwargs):
            self._block_counts = list(block_counts)
            super().__init__(partition_method="uniform", **kwargs)

        def _partition_layers(self, method="uniform"):
            parts = [0]
            for s, c in enumerate(self._block_counts):
                parts.append(parts[-1] + c + (1 if s == 0 else 0))
            parts[-1] = len(self._layer_specs)  # the last stage also takes the norm and the head
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

        def _synchronize_tied_weights(self):
            # DeepSpeed broadcasts the tied weight with grad mode on, which records c10d::broadcast_ into the
            # parameter's autograd history (torch warns at every backward); a copy needs no history.
            with torch.no_grad():
                super()._synchronize_tied_weights()

    return BlockCountPipelineModule


def BlockCountPipelineModule(block_counts: list[int], **kwargs):  # noqa: N802 (a class, built lazily)
    """See the class docstring inside `_pipeline_module_class` (deepspeed is imported on first use)."""
    return _pipeline_module_class()(block_counts, **kwargs)


# ----------------------------------------------------------------------------------- expert parallel
def expert_parallel_group(group_name: str):
    """DeepSpeed's expert-parallel group of that name (its registry has no public getter)."""
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(group_name)


def ensure_expert_groups(group_name: str, ep_size: int, pp_size: int) -> None:
    """Build DeepSpeed's expert and expert-data groups once. Its public `create_expert_and_data_parallel`
    path only runs inside its own MoE layer; the engine and ZeRO then look the groups up by name."""
    from deepspeed.utils import groups

    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size, pp_size=pp_size)


@contextlib.contextmanager
def engine_knows_expert_params(num_experts: list[int]):
    """Within this context, DeepSpeed engines built for a module with expert-marked parameters set
    `has_moe_layers`, so ZeRO and the engine reduce those gradients over the expert-data group.

    DeepSpeed sets the flag only for its own MoE layer class (in `_configure_distributed_model`); without
    it, gradients of experts that differ between ranks would be averaged across them."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    original = DeepSpeedEngine._configure_distributed_model

    def configure(self, model):
        original(self, model)
        expert = any(getattr(p, "allreduce", True) is False for p in model.parameters())
        if expert and not self.has_moe_layers:
            self.has_moe_layers = True
            self.num_experts = num_experts

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = original


# ---------------------------------------------------------------------------------------- optimizer
def relink_optimizer_state(zero_optimizer) -> None:
    """Make DeepSpeed's per-parameter views of the Adam state point at the current state tensors
    (ZeRO-1/2's optimizer and the BF16_Optimizer alike).

    DeepSpeed links them right after stepping the FIRST param group, before the other groups have any
    state, and never again: parameters of later groups would report "exp_avg not found" to
    safe_get_full_optimizer_state. Linking again once every group has state fixes the views."""
    zero_optimizer._hp_optimizer_states_linked = False
    zero_optimizer._lazy_init_hp_params_optimizer_state()


def add_bf16_grads_without_temporary(bf16_optimizer) -> None:
    """Make the BF16_Optimizer add each bf16 gradient into its fp32 sum in one pass: `hp += lp` with the
    promotion done per element, instead of DeepSpeed's `hp += lp.to(fp32)`, which first writes and then reads
    a whole fp32 copy of the gradient. Bitwise the same sum (bf16 -> fp32 is exact). With
    `bf16.immediate_grad_update` the add runs in each parameter's gradient hook, and the bf16 gradient is then
    freed: per micro-batch and parameter, 10 bytes move instead of DeepSpeed's default 28 (zeroing every bf16
    gradient, autograd adding into it, the cast, the add; tests/helpers/grad_bookkeeping_bytes.py counts them).

    DeepSpeed's `_update_hp_grad` is the one place that add lives (bf16_optimizer.py); this replaces it on this
    instance only. Its expert-parallel folding correction (AutoEP) is not used by jetmoe and is refused here."""
    import types

    if getattr(bf16_optimizer, "autoep_folding_tp_group", None) is not None:
        raise NotImplementedError("AutoEP folding is not used by jetmoe; its gradient correction is not kept here")

    @torch.no_grad()
    def _update_hp_grad(self, lp, group_idx, param_idx, clear_lp_grads):
        if lp.grad is None:
            return
        hp_grad = self.fp32_groups_gradients[group_idx][param_idx]
        hp_grad.add_(lp.grad.view(hp_grad.shape))
        lp._hp_grad = hp_grad
        self.fp32_groups_has_gradients[group_idx][param_idx] = True
        if clear_lp_grads:
            lp.grad.zero_()

    bf16_optimizer._update_hp_grad = types.MethodType(_update_hp_grad, bf16_optimizer)


def accumulate_into_fp32_grads(bf16_optimizer, params) -> None:
    """Let the backward of each of `params` add its gradient straight into the BF16_Optimizer's fp32 sum for it
    (jetmoe.model.grouped_mm: a weight with `main_grad` gets no `.grad`), so its gradient hook never fires.

    Each parameter's `main_grad` is its view of `fp32_groups_gradients`, the buffer the reduction, the norm, the
    clipping and the step read. DeepSpeed marks a parameter as having a gradient in `fp32_groups_has_gradients` when
    its hook adds one, and clears the marks with the sums after each step (`clear_hp_grads`); these parameters are
    marked for good instead (every micro-batch's backward adds into them, zero rows included)."""
    import types

    where = {id(p): (i, j) for i, group in enumerate(bf16_optimizer.bf16_groups) for j, p in enumerate(group)}
    fused = []
    for p in params:
        i, j = where[id(p)]
        hp_grad = bf16_optimizer.fp32_groups_gradients[i][j]
        p.main_grad = hp_grad.view(p.shape)
        p._hp_grad = hp_grad
        fused.append((i, j))

    def mark(self):
        for i, j in fused:
            self.fp32_groups_has_gradients[i][j] = True

    clear = bf16_optimizer.clear_hp_grads

    def clear_hp_grads(self):
        clear()
        mark(self)

    bf16_optimizer.clear_hp_grads = types.MethodType(clear_hp_grads, bf16_optimizer)
    mark(bf16_optimizer)


def grad_norm_before_update(zero_optimizer):
    """The global gradient norm (all stages, all dp ranks) that the ZeRO-1 / BF16 optimizer computed for clipping,
    read between the norm and the update (from inside its inner optimizer's step); None before the first step.
    DeepSpeed keeps it only as `_global_grad_norm` until the engine copies it after the update."""
    return getattr(zero_optimizer, "_global_grad_norm", None)


# ------------------------------------------------------------------------------------------ pipeline schedule
def accumulated_train_loss(engine):
    """The sum of this step's micro-batch losses so far (detached), on the last stage; None elsewhere. During
    `train_batch` the engine adds each micro-batch's loss to `total_loss` and averages it only after the step."""
    return engine.total_loss if engine.is_last_stage() else None


# ------------------------------------------------------------------------------------------ inference
def pipeline_outputs(engine, inputs: tuple, labels: torch.Tensor):
    """The last stage's outputs for one micro-batch of any shape run through every stage of the pipeline
    (DeepSpeed's inference schedule); None on the other stages. Every rank must call it.

    `reset_activation_shape` (public) before and after: the stages cache the shape of what they send each
    other, and these inputs differ from training's. `total_loss` is reset too: DeepSpeed adds every last-stage
    output to the training loss's accumulator, which after `train_batch` holds a scalar."""
    engine.reset_activation_shape()
    engine.total_loss = None
    try:
        _, outputs = engine.eval_batch(iter([(inputs, labels)]), return_logits=True, compute_loss=False,
                                      reduce_output=None, bcast_loss=False, num_micro_batches=1)
    finally:
        engine.total_loss = None
        engine.reset_activation_shape()
    return outputs


def zero_fragment(param):
    """DeepSpeed ZeRO-1/2's (and the BF16_Optimizer's) record of the part of `param` this rank's partition
    holds (None: none of it):
    `.lp_fragment_address` (start, numel in the flattened parameter), `.hp_fragment` (its fp32 master) and
    `.get_optim_state_fragment(key)`. The public safe_get_local_* helpers serve ZeRO-3 only; checkpoints
    need the ZeRO-1 fragments to let each rank write and read only the state it holds."""
    return getattr(param, "_hp_mapping", None)


# ------------------------------------------------------------------------------------------ timing
def time_pipeline_instructions(engine, report) -> None:
    """Call `report(instruction class name, seconds)` after each instruction of the engine's schedule (forward,
    backward, sends, receives, gradient reductions, optimizer step). The PipelineEngine runs every instruction
    through its class-level `_INSTRUCTION_MAP`; an instance copy with timed wrappers leaves other engines alone."""
    import time

    def timed(name, method):
        def run(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                report(name, start)

        return run

    engine._INSTRUCTION_MAP = {cls: timed(cls.__name__, method) for cls, method in type(engine)._INSTRUCTION_MAP.items()}
