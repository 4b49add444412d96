"""The run config: one dataclass per section, each with the one `check()` of its ranges and choices.

Hydra composes against `RunSchema` (so a misspelt key fails with "not in struct"); `RunConfig.from_composed`
converts the composed config once into typed objects, and every part of the code receives the sections it
needs: the model's own `JetMoEConfig`, the data pipeline's own `DataConfig`, and the sections below. The
`model` and `data` schemas are generated from those two dataclasses, so they never drift from what the model
and the data pipeline accept; their checks are their own (`JetMoEConfig.validate`, `DataConfig.validate`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from jetmoe.data import DataConfig
from jetmoe.errors import JetMoEError
from jetmoe.model import JetMoEConfig
from jetmoe.training.validate import in_range, one_of

_PLAIN = (int, float, bool, str)
_SAMPLE_PROMPTS = ("The history of", "Once upon a time", "In mathematics, a", "The city is known for")
SECTIONS = ("model", "data", "train", "optim", "parallel", "checkpoint", "logging", "cluster", "plan")


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


MODEL_EXTRA = [
    ("name", str, field(default="jetmoe_tiny")),  # the preset this group file was written from
    ("init_from", Optional[str], field(default=None)),  # transformers directory to start from
]
ModelSection = _schema_from(JetMoEConfig, "ModelSection", MODEL_EXTRA)
DataSection = _schema_from(DataConfig, "DataSection", [])


@dataclass
class SpikeSection:
    """Loss spikes (jetmoe.training.spike): a step whose LM loss or gradient norm rises above the recent history."""

    policy: str = "off"  # off | skip (no update for that step) | rollback (last checkpoint, skip the spike's data)
    window: int = 100  # steps of history (mean and deviation); detection starts once the window is full
    loss_sigma: float = 6.0  # a spike: lm_loss above mean + loss_sigma x deviation (0 = ignore the loss) ...
    grad_norm_sigma: float = 6.0  # ... or grad_norm above mean + grad_norm_sigma x deviation (0 = ignore it) ...
    min_rise: float = 0.1  # ... and at least this share above the mean
    skip_window: int = 10  # rollback: the spike's batch and the K before it (back to the checkpoint) are skipped
    max_rollbacks: int = 3  # per run directory; one more spike stops the run (checkpoints untouched)
    # [[start, end], ...]: positions in the data stream (samples; step s trains [s*G, (s+1)*G) unless earlier
    # batches were skipped) never trained on; a global batch that overlaps one is skipped whole
    skip_samples: List[Any] = field(default_factory=list)

    def check(self) -> None:
        one_of("train.spike.policy", self.policy, ("off", "skip", "rollback"))
        in_range("train.spike.window", self.window, 2, example="100")
        in_range("train.spike.loss_sigma", self.loss_sigma, 0, example="6")
        in_range("train.spike.grad_norm_sigma", self.grad_norm_sigma, 0, example="6")
        in_range("train.spike.min_rise", self.min_rise, 0, example="0.1")
        in_range("train.spike.skip_window", self.skip_window, 0, example="10")
        in_range("train.spike.max_rollbacks", self.max_rollbacks, 0, example="3")
        if self.policy != "off" and not (self.loss_sigma or self.grad_norm_sigma):
            raise JetMoEError(f"train.spike.policy={self.policy} but loss_sigma and grad_norm_sigma are both 0; "
                              "set one of them, e.g. train.spike.loss_sigma=6")
        for r in self.skip_samples:
            if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(v, int) for v in r)
                    and 0 <= r[0] < r[1]):
                raise JetMoEError(f"train.spike.skip_samples has {r!r}; give [start, end] sample positions with "
                                  "0 <= start < end, e.g. train.spike.skip_samples=[[4096,8192]]")


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
    compile_cache_dir: Optional[str] = None  # Inductor's cache; None: the node's own disk ($SLURM_TMPDIR, $TMPDIR, /tmp)
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
    spike: SpikeSection = field(default_factory=SpikeSection)
    # aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this much per step (0 = off; 1e-3)
    balance_bias_rate: float = 0.0
    # the balance term per micro-batch (the paper's) or over the whole global batch (jetmoe.training.global_balance)
    balance_scope: str = "micro_batch"  # micro_batch | global_batch

    def check(self) -> None:
        from jetmoe.training.profiling import profile_window

        in_range("train.lr", self.lr, 0, example="5e-4")
        in_range("train.max_steps", self.max_steps, 1, example="200")
        in_range("train.global_batch_size", self.global_batch_size, 1, example="16")
        in_range("train.micro_batch_size", self.micro_batch_size, 1, example="4")
        in_range("train.eval_every", self.eval_every, 0, example="100 (0 = never)")
        in_range("train.eval_batches", self.eval_batches, 1, example="4")
        in_range("train.log_every", self.log_every, 1, example="10")
        in_range("train.max_skipped_steps", self.max_skipped_steps, 1, example="5")
        in_range("train.stall_warn_s", self.stall_warn_s, 0, example="600 (0 = off)")
        in_range("train.balance_bias_rate", self.balance_bias_rate, 0, example="0.001 (0 = off)")
        one_of("train.balance_scope", self.balance_scope, ("micro_batch", "global_batch"))
        one_of("train.precision", self.precision, ("auto", "fp32", "bf16"))
        one_of("train.device", self.device, ("auto", "cpu", "cuda"))
        one_of("train.compile", str(self.compile).lower(), ("auto", "true", "false"))
        self.spike.check()
        if self.sample_every < 0:
            raise JetMoEError(f"train.sample_every={self.sample_every} is negative; use 0 (off) or a number of steps")
        if self.sample_every and (not self.sample_prompts or self.sample_tokens < 1 or self.sample_temperature <= 0):
            raise JetMoEError("train.sample_every is on but train.sample_prompts is empty, train.sample_tokens < 1 "
                              "or train.sample_temperature <= 0; give prompts, tokens >= 1, temperature > 0")
        profile_window(self.profile_steps)


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

    def check(self) -> None:
        from jetmoe.training.optimizer import OPTIMIZERS
        from jetmoe.training.schedules import DECAY_SHAPES, SCHEDULES

        one_of("optim.name", self.name, OPTIMIZERS)
        one_of("optim.schedule", self.schedule, SCHEDULES)
        one_of("optim.decay_shape", self.decay_shape, DECAY_SHAPES)
        in_range("optim.warmup_steps", self.warmup_steps, 0, example="20")
        in_range("optim.decay_fraction", self.decay_fraction, 0, 1, "0.1", high_ok=True)
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0, 1, "0.1", low_ok=False, high_ok=True)
        in_range("optim.weight_decay", self.weight_decay, 0, example="0.1")
        in_range("optim.beta1", self.beta1, 0, 1, "0.9")
        in_range("optim.beta2", self.beta2, 0, 1, "0.95")
        in_range("optim.eps", self.eps, 0, example="1e-8", low_ok=False)
        in_range("optim.grad_clip", self.grad_clip, 0, example="1.0 (0 = no clipping)")


@dataclass
class ParallelSection:
    pp: int = 1  # pipeline stages; dp = world / pp
    ep: int = 1  # expert-parallel degree inside each stage's data-parallel group
    ep_attention: bool = True  # also spread MoA experts over the ep ranks
    partition: Any = "uniform"  # uniform | parameters | flops | [blocks on stage 0, blocks on stage 1, ...]
    activation_checkpointing: bool = False  # recompute each block in backward
    timeout_s: int = 1800  # collective timeout; a dead peer ends the job after this

    def check(self) -> None:
        in_range("parallel.pp", self.pp, 1, example="1")
        in_range("parallel.ep", self.ep, 1, example="1")
        in_range("parallel.timeout_s", self.timeout_s, 0, example="1800", low_ok=False)
        if isinstance(self.partition, str):
            one_of("parallel.partition", self.partition.lower(), ("uniform", "parameters", "flops"))
        elif not isinstance(self.partition, list) or not all(isinstance(n, int) for n in self.partition):
            raise JetMoEError(f"parallel.partition={self.partition!r} is not uniform, parameters, flops or a list "
                              "of blocks per stage, e.g. parallel.partition=[9,8,7]")


@dataclass
class CheckpointSection:
    every: int = 0  # 0 = never
    dir: Optional[str] = None  # None = <run dir>/checkpoints
    resume: str = "auto"  # auto | none | PATH
    keep: int = 2  # newest K kept (0 = all)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of N, forever (0 = off)
    verify: str = "full"  # full: size + sha256 of each file a rank reads on resume | size: sizes only
    data_changed: str = "stop"  # resuming onto other data: stop | continue (weights, optimizer, step; this data from
    #                             the step on)
    fresh_start: str = "refuse"  # resume=none where a run's checkpoints are: refuse | move_aside (into previous-<n>/)
    # the key `checkpoint.async` (`async` is a Python keyword): true | false | null (= on with CUDA): write in a
    # background thread
    async_: Optional[bool] = None

    def check(self) -> None:
        in_range("checkpoint.every", self.every, 0, example="100 (0 = only on a stop signal)")
        in_range("checkpoint.keep", self.keep, 0, example="2 (0 = all)")
        in_range("checkpoint.keep_every", self.keep_every, 0, example="1000 (0 = off)")
        one_of("checkpoint.verify", self.verify, ("full", "size"))
        one_of("checkpoint.data_changed", self.data_changed, ("stop", "continue"))
        one_of("checkpoint.fresh_start", self.fresh_start, ("refuse", "move_aside"))
        if self.async_ is not None and not isinstance(self.async_, bool):
            raise JetMoEError(f"checkpoint.async={self.async_} is not a boolean; use true, false or null (auto)")


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
    router_window: int = 100  # steps over which router health (max/mean load, idle experts) is summed
    router_collapse_share: float = 0.9  # one expert above this share of a router's tokens counts as collapsed
    router_collapse_steps: int = 20  # collapsed for this many steps in a row: a warning and `router_collapsed`
    straggler_every: int = 100  # every N steps, each rank's compute and wait time and host are compared (0 = off)
    straggler_factor: float = 1.5  # a rank whose compute exceeds the median over all ranks by this factor is named
    progress_bar: bool = True
    console: bool = True
    tensorboard: bool = False  # also write the scalars to <run dir>/tensorboard

    def check(self) -> None:
        one_of("logging.wandb.mode", self.wandb.mode, ("offline", "online", "disabled"))
        in_range("logging.router_every", self.router_every, 0, example="10 (0 = never)")
        in_range("logging.router_window", self.router_window, 1, example="100")
        in_range("logging.router_collapse_share", self.router_collapse_share, 0, 1, "0.9", low_ok=False)
        in_range("logging.router_collapse_steps", self.router_collapse_steps, 1, example="20")
        in_range("logging.straggler_every", self.straggler_every, 0, example="100 (0 = off)")
        in_range("logging.straggler_factor", self.straggler_factor, 1, example="1.5", low_ok=False)


@dataclass
class ClusterSection:
    gpus: int = 1
    gpu: str = "h100"  # the planner's part: h100 | h100_pcie | h100_nvl | h200 | a100 (jetmoe.plan.hardware)
    peak_tflops: Optional[float] = None  # per device; None = the table's entry for the part (training: the device
    #                                      it runs on, by exact name; CPU runs and unknown parts report no MFU)
    # planner: null = time each kind of work at the GPU's efficiencies; a number = compute at this share of peak
    mfu: Optional[float] = None
    gpu_memory_gib: Optional[float] = None  # None = table by gpu
    gpus_per_node: int = 8
    storage_gbps: float = 2.0  # planner: checkpoint write bandwidth per node, GB/s
    calibration: Optional[str] = None  # planner: bench/gpu.py's JSON, whose measured efficiencies replace the defaults

    def check(self) -> None:
        from jetmoe.plan.hardware import gpu_spec

        in_range("cluster.gpus", self.gpus, 1, example="96")
        in_range("cluster.gpus_per_node", self.gpus_per_node, 1, example="8")
        if self.mfu is not None:
            in_range("cluster.mfu", self.mfu, 0, 1, "0.35 (or null: the measured efficiencies)", low_ok=False,
                     high_ok=True)
        in_range("cluster.storage_gbps", self.storage_gbps, 0, example="2.0", low_ok=False)
        for key, value, example in (("cluster.peak_tflops", self.peak_tflops, "989"),
                                    ("cluster.gpu_memory_gib", self.gpu_memory_gib, "80")):
            if value is not None:
                in_range(key, value, 0, example=example, low_ok=False)
        gpu_spec(self.gpu)  # a part the table knows


@dataclass
class PlanSection:
    search: bool = False  # train/plan.py: also rank the layouts that fit by predicted tokens/s
    search_top: int = 15  # how many of them to print

    def check(self) -> None:
        in_range("plan.search_top", self.search_top, 1, example="15")


@dataclass
class RunSchema:
    """What Hydra composes against (`run_schema`, first in config.yaml's defaults)."""

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
    """Make the schema known to Hydra as `run_schema`."""
    node = OmegaConf.structured(RunSchema)
    with open_dict(node.checkpoint):
        del node.checkpoint["async_"]
        node.checkpoint["async"] = None
    # Mixture sources are named by the user (data.sources.<any name>.path=...): new names are welcome there.
    OmegaConf.set_struct(node.data.sources, False)
    ConfigStore.instance().store(name="run_schema", node=node)


@dataclass
class RunConfig:
    """The composed config, typed and checked: each part of the code gets the sections it needs."""

    model: JetMoEConfig
    data: DataConfig
    train: TrainSection
    optim: OptimSection
    parallel: ParallelSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    cluster: ClusterSection
    plan: PlanSection = field(default_factory=PlanSection)  # train/plan.py's own options
    init_from: Optional[str] = None  # model.init_from: a transformers directory to start from
    resolved: dict = field(default_factory=dict)  # every key as composed and resolved: for the record

    @classmethod
    def from_composed(cls, cfg: DictConfig, needs: tuple[str, ...] = SECTIONS) -> "RunConfig":
        """Convert once. `needs`: the sections whose missing (`???`) keys are an error for this command."""
        ours = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's node resolves in its job
        missing = sorted(k for k in OmegaConf.missing_keys(ours) if k.split(".")[0] in needs)
        if missing:
            raise JetMoEError(f"{', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line")
        plain = OmegaConf.to_container(ours, resolve=True, throw_on_missing=False)
        absent = [s for s in SECTIONS if not isinstance(plain.get(s), dict)]
        if absent:
            raise JetMoEError(f"the config has no {', '.join(absent)} section; a primary config of your own starts "
                              "from ours: defaults: [config, _self_]")
        model = dict(plain["model"])
        model.pop("name", None)
        init_from = model.pop("init_from", None)
        checkpoint = dict(plain["checkpoint"])
        checkpoint["async_"] = checkpoint.pop("async", None)
        logging = dict(plain["logging"])
        logging["wandb"] = WandbSection(**logging["wandb"])
        train = dict(plain["train"])
        train["spike"] = SpikeSection(**train.get("spike", {}))
        try:
            return cls(model=JetMoEConfig.from_dict(model), data=DataConfig.from_any(plain["data"]),
                       train=TrainSection(**train), optim=OptimSection(**plain["optim"]),
                       parallel=ParallelSection(**plain["parallel"]), checkpoint=CheckpointSection(**checkpoint),
                       logging=LoggingSection(**logging), cluster=ClusterSection(**plain["cluster"]),
                       plan=PlanSection(**plain.get("plan", {})), init_from=init_from, resolved=plain)
        except TypeError as e:  # a key the sections do not have (a primary config without our schema)
            raise JetMoEError(f"config does not fit the schema ({e}); start your primary config from ours: "
                              "defaults: [config, _self_]") from None

    def check(self, sections: tuple[str, ...] = SECTIONS) -> "RunConfig":
        """Every range and choice of these sections, and what one section requires of another."""
        if "model" in sections:
            self.model.validate()
        if "data" in sections:
            self.data.validate(self.model.max_position_embeddings)
        for name in ("train", "optim", "parallel", "checkpoint", "logging", "cluster", "plan"):
            if name in sections:
                getattr(self, name).check()
        if "train" in sections and "checkpoint" in sections and self.train.spike.policy == "rollback" \
                and not self.checkpoint.every:
            raise JetMoEError("train.spike.policy=rollback needs checkpoints to roll back to; set checkpoint.every=N "
                              "(e.g. 1000) or use train.spike.policy=skip")
        if "train" in sections and self.train.sample_every:
            from jetmoe.training.sampling import prompt_window

            prompt_window([[0]], self.train.sample_tokens, self.model.max_position_embeddings, 0)
        return self


def use_cuda(train: TrainSection) -> bool:
    """train.device resolved against this machine."""
    import torch

    if train.device == "cuda" and not torch.cuda.is_available():
        raise JetMoEError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    return train.device == "cuda" or (train.device == "auto" and torch.cuda.is_available())


def precision(train: TrainSection, cuda: bool) -> str:
    """train.precision resolved: auto is bf16 on a GPU, fp32 on a CPU."""
    if train.precision == "auto":
        return "bf16" if cuda else "fp32"
    return train.precision

