"""Plan a layout before spending GPU hours on it.

    python train/plan.py [overrides] cluster.gpus=N [cluster.gpu=h100|h100_pcie|h100_nvl|h200|a100] [cluster.mfu=0.35]
    python train/plan.py +experiment=jetmoe_8b_96xh100
    python train/plan.py --config-dir /my/conf +experiment=mine      (or hydra.searchpath=[file:///my/conf])

Composes the same config as train/pretrain.py, prints a table (parameters, memory per GPU, FLOPs,
communication, bubble, throughput, warnings, suggestions) and, as its last line, one JSON object.
Needs no GPU and no process group; data paths may stay unset.
"""

import sys

NEEDS = ("model", "train", "optim", "parallel", "cluster")  # the sections whose keys must be set and valid


def main(argv: list[str]) -> int:
    from jetmoe.errors import JetMoEError
    from jetmoe.log import get_logger
    from jetmoe.plan import inputs_from_config, json_line, make_plan, render
    from jetmoe.training.compose import load

    logger = get_logger("plan")
    if any(a in ("-h", "--help") for a in argv):
        logger.info(__doc__.strip())
        return 0
    try:
        plan = make_plan(inputs_from_config(load(argv, NEEDS)))
    except JetMoEError as e:
        logger.error(f"error: {e}")
        return 2
    logger.info(render(plan))
    logger.info(json_line(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
