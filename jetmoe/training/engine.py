"""Process group, DeepSpeed config and the PipelineEngine (every layout, pp=1 included, is a pipeline)."""

from __future__ import annotations

import copy
import json
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
from omegaconf import DictConfig

from jetmoe.errors import JetMoEError
from jetmoe.parallel.pipeline import StageContext, build_pipeline
from jetmoe.parallel.topology import Layout, deepspeed_topology, make_layout
from jetmoe.training.router_stats import RouterTracker
from jetmoe.training.schedules import lr_multiplier


# ---------------------------------------------------------------------------------------------- process
def use_cuda(cfg: DictConfig) -> bool:
    device = cfg.train.device
    if device not in ("auto", "cpu", "cuda"):
        raise JetMoEError(f"train.device={device!r} is unknown; use auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise JetMoEError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def precision(cfg: DictConfig) -> str:
    p = cfg.train.precision
    if p not in ("auto", "fp32", "bf16"):
        raise JetMoEError(f"train.precision={p!r} is unknown; use auto, fp32 or bf16")
    if p == "auto":
        return "bf16" if use_cuda(cfg) else "fp32"
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: DictConfig) -> tuple[int, int]:
    """Start (or reuse) the default process group; returns (rank, world size).

    A plain `python` process gets a one-rank environment first: without RANK/WORLD_SIZE DeepSpeed would
    try MPI discovery."""
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_task_env()  # e.g. hydra/launcher=submitit_slurm with several tasks: no launcher set RANK
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    cuda = use_cuda(cfg)
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        # After a torchrun --max-restarts restart the group needs fresh store keys; deepspeed then reuses it.
        from jetmoe.training.checkpoint.restart import init_process_group_for_restart

        init_process_group_for_restart("nccl" if cuda else "gloo", timedelta(seconds=cfg.parallel.timeout_s))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=timedelta(seconds=cfg.parallel.timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _export_slurm_task_env() -> None:
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise JetMoEError("several Slurm tasks but no RANK in the environment and submitit is not installed; "
                          "start the tasks through torchrun (launch/slurm.sbatch) or pip install submitit") from None
    TorchDistributedEnvironment().export()


# ----------------------------------------------------------------------------------------------- config
def grad_accumulation(global_batch: int, micro_batch: int, dp: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank."""
    if global_batch < 1 or micro_batch < 1:
        raise JetMoEError(
            f"train.global_batch_size={global_batch} and train.micro_batch_size={micro_batch} must be >= 1")
    per_step = micro_batch * dp
    if global_batch % per_step:
        lower = max(per_step, global_batch // per_step * per_step)
        raise JetMoEError(
            f"train.global_batch_size={global_batch} is not a multiple of train.micro_batch_size={micro_batch} "
            f"x dp={dp} (= {per_step}); use e.g. train.global_batch_size={lower} or "
            f"{lower + per_step}, or another micro_batch_size")
    return global_batch // per_step


def deepspeed_config(cfg: DictConfig, dp: int) -> dict:
    """DeepSpeed's config generated from ours; `train.deepspeed_config` (a JSON file) overrides values."""
    gas = grad_accumulation(cfg.train.global_batch_size, cfg.train.micro_batch_size, dp)
    bf16 = precision(cfg) == "bf16"
    ds = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": 1},
        # fp32 ZeRO-1 skips a step whose gradient norm is not finite; bf16 must be asked to.
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    path = cfg.train.deepspeed_config
    if path:
        path = _resolve(path)
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


def _resolve(path: str) -> str:
    from hydra.utils import to_absolute_path

    try:
        return to_absolute_path(path)
    except ValueError:  # no Hydra app running (library use)
        return os.path.abspath(path)


# ----------------------------------------------------------------------------------------------- engine
def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (and expert weight stacks) decay; norms and biases do not."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


@dataclass
class EngineParts:
    engine: object  # deepspeed PipelineEngine
    module: object  # the stage's JetMoEPipeline (engine.module)
    layout: Layout
    tracker: RouterTracker
    context: StageContext
    grad_accumulation: int
    ds_config: dict

    @property
    def global_names(self) -> dict[str, str]:
        """Local parameter name -> transformers' global name (for checkpoints)."""
        return self.module.global_names


def layout_for(cfg: DictConfig, model_config, rank: int, world: int) -> Layout:
    return make_layout(world, rank, cfg.parallel.pp, cfg.parallel.ep, model_config.num_hidden_layers,
                       model_config.num_local_experts)


def build_engine(cfg: DictConfig, model_config, layout: Layout) -> EngineParts:
    import deepspeed

    ds_config = deepspeed_config(cfg, layout.dp)
    gas = ds_config["gradient_accumulation_steps"]
    tracker = RouterTracker(model_config.num_hidden_layers, model_config.num_local_experts)
    context = StageContext(grad_scale=1.0 / gas,
                           checkpointing=bool(cfg.parallel.activation_checkpointing
                                              or model_config.gradient_checkpointing))
    partition = cfg.parallel.partition
    if not isinstance(partition, str):
        partition = list(partition)
    torch.manual_seed(cfg.train.seed)
    module = build_pipeline(model_config, layout, deepspeed_topology(layout), partition, cfg.train.seed,
                            tracker, context)
    if precision(cfg) == "bf16":
        module.to(torch.bfloat16)
    groups = param_groups(module, cfg.optim.weight_decay)
    initialize = deepspeed.initialize

    if layout.ep > 1:
        # Runs after the full expert weights are initialised (so every layout starts from the same
        # weights) and before the optimizer sees any parameter.
        from jetmoe.parallel import expert

        ep_group, ep_rank = expert.create_expert_groups(layout.ep, layout.pp)
        expert.apply_expert_parallel(module, ep_group, ep_rank, layout.ep,
                                     include_attention=cfg.parallel.ep_attention)
        groups = expert.moe_param_groups(param_groups(module, cfg.optim.weight_decay))
        initialize = expert.expert_aware_initialize

    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  eps=cfg.optim.eps)
    multiplier = lr_multiplier(cfg.optim.schedule, cfg.train.max_steps, cfg.optim.warmup_steps,
                               cfg.optim.min_lr_ratio, cfg.optim.decay_fraction, cfg.optim.decay_shape)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    engine, _, _, _ = initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return EngineParts(engine=engine, module=module, layout=layout, tracker=tracker, context=context,
                       grad_accumulation=gas, ds_config=ds_config)
