"""Read the planner's inputs from the same composed Hydra config train/pretrain.py uses."""

from typing import Any

from jetmoe.errors import JetMoEError
from jetmoe.plan.hardware import gpu_spec
from jetmoe.plan.layout import Layout
from jetmoe.plan.memory import Precision
from jetmoe.plan.params import ModelShape, cfg_get
from jetmoe.plan.planner import PlanInputs

DEFAULT_MFU = 0.4


def _section(cfg: Any, name: str) -> Any:
    sec = cfg_get(cfg, name)
    return {} if sec is None else sec


def _first(sec: Any, names: tuple[str, ...], default: Any) -> Any:
    for n in names:
        v = cfg_get(sec, n)
        if v is not None:
            return v
    return default


def _partition(value: Any) -> Any:
    return value if isinstance(value, str) else [int(x) for x in value]


def inputs_from_config(cfg: Any) -> PlanInputs:
    model, data, train = _section(cfg, "model"), _section(cfg, "data"), _section(cfg, "train")
    par, cluster = _section(cfg, "parallel"), _section(cfg, "cluster")
    gpus = cfg_get(cluster, "gpus")
    if gpus in (None, "???"):
        raise JetMoEError("the planner needs the cluster size: add cluster.gpus=N (e.g. cluster.gpus=96)")
    gpu = gpu_spec(
        _first(cluster, ("gpu",), "h100"),
        cfg_get(cluster, "peak_tflops"),
        _first(cluster, ("gpu_memory_gib", "memory_gib"), None),
    )
    dtype = str(_first(train, ("precision", "dtype"), "bf16")).lower()
    checkpointing = bool(_first(model, ("gradient_checkpointing",), False)) or bool(
        _first(par, ("activation_checkpointing",), False)
    )
    return PlanInputs(
        shape=ModelShape.from_config(model),
        layout=Layout(
            gpus=int(gpus),
            pp=int(_first(par, ("pp",), 1)),
            ep=int(_first(par, ("ep",), 1)),
            ep_attention=bool(_first(par, ("ep_attention",), True)),
            gpus_per_node=int(_first(cluster, ("gpus_per_node",), 8)),
            partition=_partition(_first(par, ("partition",), "uniform")),
        ),
        gpu=gpu,
        seq_len=int(_first(data, ("seq_len",), 4096)),
        global_batch=int(_first(train, ("global_batch_size",), 1)),
        micro_batch=int(_first(train, ("micro_batch_size",), 1)),
        mfu=float(_first(cluster, ("mfu",), DEFAULT_MFU)),
        precision=Precision.named(dtype),
        checkpointing=checkpointing,
        document_mask=bool(_first(data, ("document_mask",), False)),
    )
