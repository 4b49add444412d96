"""Read the planner's inputs from the same typed run config train/pretrain.py uses."""

from typing import Any

from jetmoe.plan.calibration import load_calibration
from jetmoe.plan.hardware import default_efficiencies, gpu_spec
from jetmoe.plan.layout import ClusterLayout
from jetmoe.plan.memory import Precision
from jetmoe.plan.params import ModelShape
from jetmoe.plan.planner import PlanInputs


def _partition(value: Any) -> Any:
    return value if isinstance(value, str) else [int(x) for x in value]


def inputs_from_config(config: Any) -> PlanInputs:
    """config: the typed run config (jetmoe.training.config.RunConfig) of the same command line train/pretrain.py
    takes, its cluster section checked; the planner reads its model, data (seq_len, document_mask), train,
    parallel and cluster sections."""
    model, data, train, par, cluster = config.model, config.data, config.train, config.parallel, config.cluster
    precision = "bf16" if train.precision == "auto" else train.precision  # auto means bf16 on a GPU
    calibration = load_calibration(cluster.calibration) if cluster.calibration else None
    # A calibration's device sets the peak behind predicted MFU, unless the user gives one.
    peak = cluster.peak_tflops if cluster.peak_tflops is not None else (calibration.peak_tflops if calibration else None)
    gpu = gpu_spec(cluster.gpu, peak, cluster.gpu_memory_gib)
    return PlanInputs(
        shape=ModelShape.from_config(model),
        layout=ClusterLayout(
            gpus=int(cluster.gpus),
            pp=int(par.pp),
            ep=int(par.ep),
            ep_attention=bool(par.ep_attention),
            gpus_per_node=int(cluster.gpus_per_node),
            partition=_partition(par.partition),
        ),
        gpu=gpu,
        seq_len=int(data.seq_len),
        global_batch=int(train.global_batch_size),
        micro_batch=int(train.micro_batch_size),
        efficiencies=calibration.efficiencies if calibration else default_efficiencies(gpu),
        mfu=float(cluster.mfu) if cluster.mfu is not None else None,
        precision=Precision.named(str(precision).lower()),
        checkpointing=bool(model.gradient_checkpointing or par.activation_checkpointing),
        document_mask=bool(data.document_mask),
        storage_gbps=float(cluster.storage_gbps),
        compiled=str(train.compile).lower() != "false",
        calibration=calibration,
    )
