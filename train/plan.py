"""Plan a layout before spending GPU hours on it.

    python train/plan.py [overrides] cluster.gpus=N [cluster.gpu=h100|a100|h200]
    python train/plan.py +experiment=jetmoe_8b_96xh100 [cluster.calibration=gpu_check.json] [plan.search=true]

Composes the same Hydra config as train/pretrain.py, prints a table (parameters, memory per GPU,
FLOPs, communication, the step's time cost by cost, throughput, warnings, suggestions; with plan.search=true the
layouts that fit, ranked) and, as its last line, one JSON object.
Needs no GPU and no process group.
"""

import sys


def compose_config(overrides: list[str]):
    """The config train/pretrain.py would run with these overrides."""
    from hydra import compose, initialize_config_dir

    from jetmoe.training.cli import CONFIG_DIR, register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="config", overrides=overrides)


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from jetmoe.errors import JetMoEError
    from jetmoe.plan import inputs_from_config, json_line, make_plan, render
    from jetmoe.plan.report import render_search
    from jetmoe.plan.search import search_layouts

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = compose_config(argv)
        inputs = inputs_from_config(cfg)
        plan = make_plan(inputs)
        ranked = search_layouts(inputs) if cfg.plan.search else None
    except JetMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: bad override or config: {first}", file=sys.stderr)
        return 2
    print(render(plan))
    if ranked is not None:
        print(render_search(ranked, cfg.plan.search_top, plan))
    print(json_line(plan, [c.row() for c in ranked[:cfg.plan.search_top]] if ranked is not None else None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
