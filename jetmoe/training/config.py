"""The structured Hydra config: one dataclass per section, so a misspelt key fails with Hydra's
"not in struct" message. The `model` and `data` sections are generated from the model's and the
data pipeline's own dataclasses, so they can never drift from what those packages accept."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from jetmoe.errors import JetMoEError

_PLAIN = (int, float, bool, str)
_SAMPLE_PROMPTS = ("The history of", "Once upon a time", "In mathematics, a", "The city is known for")


def _omegaconf_type(tp: Any) -> Any:
    """The closest type OmegaConf can validate: plain scalars (optionally Optional), else Any."""
    if tp in _PLAIN:
        return tp
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in _PLAIN:
            return Optional[args[0]]
    return Any


def _schema_from(cls: type, name: str, extra: list[tuple]) -> type:
    """A dataclass with the fields of `cls` (types simplified for OmegaConf) plus `extra` fields."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = MISSING
        tp = _omegaconf_type(hints.get(f.name, Any))
        if isinstance(default, (dict, list)):
            fields.append((f.name, Any, field(default_factory=lambda d=default: d)))
        else:
            fields.append((f.name, tp, field(default=default)))
    return dataclasses.make_dataclass(name, extra + fields)


def _model_schema() -> type:
    from jetmoe.model import JetMoEConfig

    extra = [
        ("name", str, field(default="jetmoe_tiny")),  # the preset this group file was written from
        ("init_from", Optional[str], field(default=None)),  # transformers directory to start from
    ]
    return _schema_from(JetMoEConfig, "ModelSection", extra)


def _data_schema() -> type:
    from jetmoe.data import DataConfig

    return _schema_from(DataConfig, "DataSection", [])


ModelSection = _model_schema()
DataSection = _data_schema()


@dataclass
class TrainSection:
    max_steps: int = 200
    global_batch_size: int = 16  # samples per optimizer step, all data-parallel ranks together
    micro_batch_size: int = 4  # samples per forward pass on one rank
    seed: int = 1234  # fixes the initial weights and the samples of every step
    lr: float = 5e-4  # peak learning rate
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    compile: str = "auto"  # auto (on with CUDA) | true | false: torch.compile of each block (jetmoe.parallel.compile)
    deterministic: bool = False  # torch's deterministic algorithms: bitwise-repeatable steps on one layout
    deepspeed_config: Optional[str] = None  # JSON file whose values override the generated config
    eval_every: int = 100  # 0 = never; also runs after the last step
    eval_batches: int = 4  # global batches of held-out data per evaluation
    max_skipped_steps: int = 5  # consecutive non-finite steps that stop the run
    log_every: int = 1  # console line every N steps (metrics.jsonl gets every step)
    stall_warn_s: float = 600  # no progress for this long: each rank prints its step and stack (0 = off)
    sample_every: int = 0  # greedy + temperature continuations of sample_prompts every N steps (0 = off)
    sample_prompts: List[str] = field(default_factory=lambda: list(_SAMPLE_PROMPTS))
    sample_tokens: int = 32  # new tokens per continuation
    sample_temperature: float = 0.8
    profile_steps: List[int] = field(default_factory=list)  # [a, b]: torch.profiler trace of steps a..b


@dataclass
class OptimSection:
    name: str = "adamw"
    schedule: str = "wsd"  # wsd | cosine | constant
    warmup_steps: int = 20
    decay_fraction: float = 0.1  # wsd: share of max_steps spent decaying at the end
    decay_shape: str = "exp"  # wsd decay: exp | linear | cosine
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping


@dataclass
class ParallelSection:
    pp: int = 1  # pipeline stages; dp = world / pp
    ep: int = 1  # expert-parallel degree inside each stage's data-parallel group
    ep_attention: bool = True  # also spread MoA experts over the ep ranks
    partition: Any = "uniform"  # uniform | parameters | [blocks on stage 0, blocks on stage 1, ...]
    activation_checkpointing: bool = False  # recompute each block in backward
    timeout_s: int = 1800  # collective timeout; a dead peer ends the job after this


@dataclass
class CheckpointSection:
    every: int = 0  # 0 = never
    dir: Optional[str] = None  # None = <run dir>/checkpoints
    resume: str = "auto"  # auto | none | PATH
    keep: int = 2  # newest K kept (0 = all)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of N, forever (0 = off)
    verify: str = "full"  # full: size + sha256 of each file a rank reads on resume | size: sizes only
    data_changed: str = "stop"  # resuming onto other data: stop | continue (weights, optimizer, step; new data order)
    # checkpoint.async (null = on with CUDA, off on CPU) is added in register_configs: `async` is a keyword


@dataclass
class WandbSection:
    mode: str = "offline"  # offline | online | disabled
    project: str = "jetmoe"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    dir: Optional[str] = None  # None = <run dir>


@dataclass
class LoggingSection:
    wandb: WandbSection = field(default_factory=WandbSection)
    router_every: int = 10  # per-layer router statistics every N steps (0 = never)
    progress_bar: bool = True
    console: bool = True
    tensorboard: bool = False  # also write the scalars to <run dir>/tensorboard


@dataclass
class ClusterSection:
    gpus: int = 1
    gpu: str = "h100"  # h100 | a100 | h200 (peak tables in jetmoe.training.metrics)
    peak_tflops: Optional[float] = None  # per device; None = table by gpu (CPU runs report no MFU)
    mfu: Optional[float] = None  # planner: null = time each kind of work at the GPU's efficiencies; a number = compute at this share of peak
    gpu_memory_gib: Optional[float] = None  # None = table by gpu
    gpus_per_node: int = 8
    storage_gbps: float = 2.0  # planner: checkpoint write bandwidth per node, GB/s
    calibration: Optional[str] = None  # planner: bench/gpu.py's JSON, whose measured efficiencies replace the defaults


@dataclass
class PlanSection:
    search: bool = False  # train/plan.py: also rank the layouts that fit by predicted tokens/s
    search_top: int = 15  # how many of them to print


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    cluster: ClusterSection = field(default_factory=ClusterSection)
    plan: PlanSection = field(default_factory=PlanSection)


def register_configs() -> None:
    """Make the schema known to Hydra as `run_schema` (config.yaml lists it first in its defaults)."""
    node = OmegaConf.structured(RunConfig)
    with open_dict(node.checkpoint):
        node.checkpoint["async"] = None  # true | false | null (= on with CUDA): write in a background thread
    ConfigStore.instance().store(name="run_schema", node=node)


def use_cuda(cfg: DictConfig) -> bool:
    device = cfg.train.device
    if device not in ("auto", "cpu", "cuda"):
        raise JetMoEError(f"train.device={device!r} is unknown; use auto, cpu or cuda")
    import torch

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


def model_config(cfg: DictConfig):
    """The JetMoEConfig described by the `model` section."""
    from jetmoe.model import JetMoEConfig

    d = OmegaConf.to_container(cfg.model, resolve=True)
    d.pop("name", None)
    d.pop("init_from", None)
    mc = JetMoEConfig.from_dict(d)
    if hasattr(mc, "validate"):
        mc.validate()
    return mc


def data_config(cfg: DictConfig):
    """The DataConfig described by the `data` section."""
    from jetmoe.data import DataConfig

    d = OmegaConf.to_container(cfg.data, resolve=True)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise JetMoEError(f"unknown data key(s) {unknown}; known keys: {sorted(known)}")
    return DataConfig(**d)
