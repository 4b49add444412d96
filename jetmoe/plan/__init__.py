"""The cluster planner: parameters, memory, FLOPs, communication and throughput of a layout.

Pure arithmetic from the model config and the layout: no GPU, no process group, no torch model.
"""

from jetmoe.plan.config import inputs_from_config
from jetmoe.plan.hardware import GPUS, gpu_spec
from jetmoe.plan.params import ModelShape, ParamCounts, count_params
from jetmoe.plan.planner import Plan, PlanInputs, make_plan
from jetmoe.plan.report import json_line, render

__all__ = [
    "GPUS", "ModelShape", "ParamCounts", "Plan", "PlanInputs", "count_params", "gpu_spec",
    "inputs_from_config", "json_line", "make_plan", "render",
]
