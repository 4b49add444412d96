"""For the helper scripts that drive a Trainer in-process: `RUN_DIR [overrides...]` -> a set-up Trainer."""

from hydra import compose, initialize_config_dir

from jetmoe.training.cli import CONFIG_DIR, register, strip_local_rank
from jetmoe.training.trainer import Trainer


def trainer_from_args(argv: list[str]):
    """(Trainer set up in RUN_DIR with the overrides, its composed config)."""
    args = strip_local_rank(argv)
    run_dir, overrides = args[0], args[1:]
    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    return Trainer(cfg, run_dir).setup(), cfg
