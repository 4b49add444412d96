"""DeepSpeed's config and the PipelineEngine around this rank's stage (every layout, pp=1 included, is a
pipeline). Process groups: jetmoe.parallel.process_group; optimizer: jetmoe.training.optimizer."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch

from jetmoe.data.loader import micro_batches_per_step
from jetmoe.errors import JetMoEError
from jetmoe.model import GroupedExperts
from jetmoe.parallel import expert
from jetmoe.parallel.activation_checkpoint import apply_activation_checkpointing
from jetmoe.parallel.deepspeed_internals import accumulate_into_fp32_grads, add_bf16_grads_without_temporary
from jetmoe.parallel.pipeline import RouterLossHook, build_pipeline, stage_blocks
from jetmoe.parallel.topology import Layout, deepspeed_topology
from jetmoe.paths import resolve_user_path
from jetmoe.training.config import OptimSection, ParallelSection, TrainSection
from jetmoe.training.optimizer import build_optimizer, param_groups


def deepspeed_config(train: TrainSection, optim: OptimSection, dp: int, bf16: bool) -> dict:
    """DeepSpeed's config generated from ours; `train.deepspeed_config` (a JSON file) overrides values."""
    gas = micro_batches_per_step(train.global_batch_size, train.micro_batch_size, dp)
    ds = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": 1},
        # fp32 ZeRO-1 skips a step whose gradient norm is not finite; bf16 must be asked to. Each bf16 gradient
        # is added into the fp32 sum as backward produces it, then freed (no whole-stage zero and add sweeps).
        "bf16": {"enabled": bf16, "check_grad_overflow": True, "immediate_grad_update": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if bf16:
        # bf16 weights, but gradients summed in fp32, over the micro-batches (DeepSpeed's BF16_Optimizer, with
        # fp32 master weights) and over the data-parallel ranks; by default DeepSpeed would do both in bf16.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
        ds["communication_data_type"] = "fp32"
    path = train.deepspeed_config
    if path:
        path = str(resolve_user_path(path))
        try:
            with open(path) as f:
                user = json.load(f)
        except FileNotFoundError:
            raise JetMoEError(f"train.deepspeed_config={path} does not exist; give a DeepSpeed JSON file") from None
        except json.JSONDecodeError as e:
            raise JetMoEError(f"train.deepspeed_config={path} is not valid JSON ({e})") from None
        ds = _merge(ds, user)
        batch = (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp)
        if ds["train_batch_size"] != batch:
            raise JetMoEError(
                f"{path}: train_batch_size={ds['train_batch_size']} != micro batch x accumulation x dp = {batch}; "
                "set batch sizes through train.global_batch_size / train.micro_batch_size instead")
        if ds.get("zero_optimization", {}).get("stage", 1) > 1:
            raise JetMoEError(f"{path}: ZeRO stage > 1 does not work with the pipeline engine; use stage 0 or 1")
    return ds


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def compile_on(mode: str, cuda: bool, cache_dir: str | None) -> bool:
    """train.compile resolved; when on, Inductor's cache in `cache_dir` (train.compile_cache_dir; None: the node's
    own disk) and its compile workers capped per rank."""
    from jetmoe.parallel.compile import cap_compile_threads, compile_enabled, use_cache_dir

    on = compile_enabled(mode, cuda)
    if on:
        use_cache_dir(cache_dir)
        cap_compile_threads()
    return on


class EngineCounters:
    """The PipelineEngine's own step counters, as a checkpoint's named state (state_dict / load_state_dict)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        e = self.engine
        return {"global_steps": int(e.global_steps), "global_samples": int(e.global_samples),
                "skipped_steps": int(e.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        e = self.engine
        e.global_steps = int(state.get("global_steps", e.global_steps))
        e.global_samples = int(state.get("global_samples", e.global_samples))
        e.skipped_steps = int(state.get("skipped_steps", e.skipped_steps))


@dataclass
class EngineParts:
    """What the trainer and the checkpoints work with."""

    engine: object  # deepspeed PipelineEngine
    module: object  # the stage's PipelineModule (engine.module)
    optimizer: object  # the engine's (ZeRO) optimizer
    scheduler: object  # the LR scheduler
    grad_accumulation: int
    ds_config: dict
    compiled: bool = False  # train.compile resolved: the stage's blocks run through torch.compile

    @property
    def global_names(self) -> dict[str, str]:
        """Local parameter name -> transformers' global name (for checkpoints)."""
        return self.module.global_names


def expert_weights(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The [experts, out, in] weights of this stage's grouped expert layers (MoA and MoE), trainable ones."""
    return [m.weight for m in module.modules() if isinstance(m, GroupedExperts) and m.weight.requires_grad]


def build_engine(train: TrainSection, optim: OptimSection, parallel: ParallelSection, model_config, layout: Layout, *,
                 device: torch.device, bf16: bool, compiled: bool, document_mask: bool, seq_len: int,
                 on_router_loss: RouterLossHook | None) -> EngineParts:
    """This rank's stage, built on `device` and initialised identically for every layout, with experts spread over
    ep, wrapped in DeepSpeed's PipelineEngine with ZeRO-1. compiled: train.compile resolved (compile_on)."""
    import deepspeed

    ds_config = deepspeed_config(train, optim, layout.dp, bf16)
    gas = ds_config["gradient_accumulation_steps"]
    partition = parallel.partition
    if not isinstance(partition, str):
        partition = list(partition)
    torch.manual_seed(train.seed)
    module = build_pipeline(model_config, layout, deepspeed_topology(layout), partition, train.seed,
                            grad_scale=1.0 / gas, on_router_loss=on_router_loss, document_mask=document_mask,
                            compile=compiled, device=device, dtype=torch.bfloat16 if bf16 else torch.float32,
                            seq_len=seq_len)
    initialize = deepspeed.initialize
    if layout.ep > 1:
        # After the full expert weights are initialised (so every layout starts from the same weights) and
        # before the optimizer sees any parameter.
        ep_group, ep_rank = expert.create_expert_groups(layout.ep, layout.pp)
        expert.apply_expert_parallel(module, ep_group, ep_rank, layout.ep, include_attention=parallel.ep_attention)
        initialize = expert.expert_aware_initialize
    if parallel.activation_checkpointing or model_config.gradient_checkpointing:
        apply_activation_checkpointing(stage_blocks(module))  # after expert parallelism: it wraps its dispatchers
    groups = param_groups(module, optim.weight_decay)
    if layout.ep > 1:
        groups = expert.moe_param_groups(groups)
    optimizer, scheduler = build_optimizer(optim, train, groups)
    engine, _, _, _ = initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    if getattr(engine.optimizer, "immediate_grad_update", False):
        add_bf16_grads_without_temporary(engine.optimizer)
        accumulate_into_fp32_grads(engine.optimizer, expert_weights(module))
    return EngineParts(engine=engine, module=module, optimizer=engine.optimizer, scheduler=engine.lr_scheduler,
                       grad_accumulation=gas, ds_config=ds_config, compiled=compiled)
