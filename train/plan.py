"""Plan a layout before spending GPU hours on it.

    python train/plan.py [overrides] cluster.gpus=N [cluster.gpu=h100|h100_pcie|h100_nvl|h200|a100]
    python train/plan.py +experiment=jetmoe_8b_96xh100 [cluster.calibration=gpu_check.json] [plan.search=true]
    python train/plan.py --config-dir /my/conf +experiment=mine      (or hydra.searchpath=[file:///my/conf])

Composes the same config as train/pretrain.py, prints a table (parameters, memory per GPU, FLOPs, communication,
the step's time cost by cost, throughput, warnings, suggestions; with plan.search=true the layouts that fit,
ranked) and, as its last line, one JSON object. Needs no GPU and no process group; data paths may stay unset.
"""

import sys

NEEDS = ("model", "train", "optim", "parallel", "cluster", "plan")  # the sections whose keys must be set and valid


def main(argv: list[str]) -> int:
    from jetmoe.errors import JetMoEError
    from jetmoe.log import get_logger
    from jetmoe.plan import inputs_from_config, json_line, make_plan, render
    from jetmoe.plan.report import render_search
    from jetmoe.plan.search import search_layouts
    from jetmoe.training.compose import load

    logger = get_logger("plan")
    if any(a in ("-h", "--help") for a in argv):
        logger.info(__doc__.strip())
        return 0
    try:
        config = load(argv, NEEDS)
        inputs = inputs_from_config(config)
        plan = make_plan(inputs)
        ranked = search_layouts(inputs) if config.plan.search else None
    except JetMoEError as e:
        logger.error(f"error: {e}")
        return 2
    top = config.plan.search_top
    logger.info(render(plan))
    if ranked is not None:
        logger.info(render_search(ranked, top, plan))
    logger.info(json_line(plan, [c.row() for c in ranked[:top]] if ranked is not None else None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
