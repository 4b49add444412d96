"""Entry point behind train/pretrain.py: argv clean-up for launchers, the config composed, converted and checked
once before anything starts, then the run inside Hydra's job (run directory, job logging).

Hydra's own flags (-m for a sweep or a Slurm launcher, --cfg, --help, ...) hand the command line to Hydra's main,
which composes it and calls the same job; --config-dir/-cd and --config-name/-cn work either way
(jetmoe.training.compose).
"""

from __future__ import annotations

import logging
import os
import sys

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger
from jetmoe.training.compose import CONFIG_DIR, PRIMARY, compose, split_args

logger = get_logger(__name__)
NOT_RANK0 = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def strip_local_rank(argv: list[str]) -> list[str]:
    """Drop the deepspeed launcher's `--local_rank=N` (or `--local_rank N`), which Hydra would reject."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
            continue
        out.append(arg)
    return out


def load_run(argv: list[str]):
    """(the composed config with Hydra's node, the typed and checked RunConfig): everything a run is refused
    for is found here, before a directory is made."""
    from jetmoe.training.config import RunConfig
    from jetmoe.training.validate import check_writable

    cfg = compose(argv, with_hydra=True)
    config = RunConfig.from_composed(cfg).check()
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the run directory
        check_writable(cfg.hydra.run.dir)
    return cfg, config


def _job(config):
    """Hydra's task function: the run in the run directory Hydra made (config None: convert Hydra's own)."""

    def task(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig

        from jetmoe.log import reclaim
        from jetmoe.training.config import RunConfig
        from jetmoe.training.failures import fail
        from jetmoe.training.trainer import run

        reclaim()  # Hydra's job logging has just been configured (on ranks other than 0: every logger disabled)
        logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op-builder gcc chatter
        try:
            run(config or RunConfig.from_composed(cfg).check(), HydraConfig.get().runtime.output_dir)
        except Exception as e:  # any rank: printed with its rank, peers told, the job ends (failures.py)
            fail(e)

    return task


def _run_job(cfg, config) -> None:
    """The run as Hydra's main would run it (run directory, job logging, callbacks), without composing again."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.utils import run_job
    from hydra.types import HydraContext, RunMode
    from omegaconf import open_dict

    with open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.RUN
    callbacks = Callbacks(cfg)
    ret = run_job(task_function=_job(config), config=cfg, job_dir_key="hydra.run.dir", job_subdir_key=None,
                  hydra_context=HydraContext(config_loader=None, callbacks=callbacks))
    _ = ret.return_value  # raises what the job raised


def _hydra_main(argv: list[str]) -> None:
    """Hydra's own flags: its main parses them, composes and runs the job (or a sweep of jobs)."""
    import hydra

    sys.argv = [sys.argv[0]] + argv
    hydra.main(config_path=str(CONFIG_DIR), config_name=PRIMARY, version_base=None)(_job(None))()


def main() -> None:
    argv = strip_local_rank(sys.argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed warn that it guessed
    if os.environ.get("RANK", "0") != "0":
        argv += NOT_RANK0  # only rank 0 writes the run directory; the others keep Hydra's files and logs out of it
    try:
        try:
            hydra_flags = split_args(argv).others
            if not hydra_flags:
                cfg, config = load_run(argv)
        except JetMoEError as e:
            _fail(e)
        if hydra_flags:
            from jetmoe.training.compose import register

            register()
            _hydra_main(argv)
        else:
            _run_job(cfg, config)
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler is in place (start-up): nothing to save yet
        logger.error("interrupted (SIGINT) before training started; nothing was saved")
        sys.exit(130)


def _fail(e: BaseException) -> None:
    logger.error(f"error: {e}")  # rank 0's line; every rank exits
    sys.exit(2)
