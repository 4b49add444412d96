"""For the helper scripts that drive a Trainer in-process: `RUN_DIR [overrides...]` -> a set-up Trainer."""

from jetmoe.training.cli import strip_local_rank
from jetmoe.training.compose import load
from jetmoe.training.trainer import Trainer


def trainer_from_args(argv: list[str]):
    """(Trainer set up in RUN_DIR with the overrides, its typed config)."""
    args = strip_local_rank(argv)
    run_dir, overrides = args[0], args[1:]
    config = load(overrides)
    return Trainer(config, run_dir).setup(), config
