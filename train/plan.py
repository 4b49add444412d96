"""Plan a layout before spending GPU hours on it.

    python train/plan.py [overrides] cluster.gpus=N [cluster.gpu=h100|a100|h200] [cluster.mfu=0.35]
    python train/plan.py +experiment=jetmoe_8b_96xh100

Composes the same Hydra config as train/pretrain.py, prints a table (parameters, memory per GPU,
FLOPs, communication, bubble, throughput, warnings, suggestions) and, as its last line, one JSON object.
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

    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        cfg = compose_config(argv)
        plan = make_plan(inputs_from_config(cfg))
    except JetMoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (HydraException, OmegaConfBaseException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: bad override or config: {first}", file=sys.stderr)
        return 2
    print(render(plan))
    print(json_line(plan), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
