"""Entry point behind train/pretrain.py: argv clean-up for launchers, override checking, Hydra app."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


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


def run_stamp() -> str:
    """Run-directory stamp shared by all ranks a launcher started on one node: JETMOE_RUN_STAMP if set,
    else the launcher's (parent process's) start time when several ranks run, else now."""
    if os.environ.get("JETMOE_RUN_STAMP"):
        return os.environ["JETMOE_RUN_STAMP"]
    when = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        when = _parent_start_time() or when
    return time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(when))


def _parent_start_time() -> float | None:
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def register() -> None:
    """Schema and resolvers; call before composing configs/ (plan.py and tests do too)."""
    from omegaconf import OmegaConf

    from jetmoe.training.config import register_configs

    register_configs()
    if not OmegaConf.has_resolver("jetmoe_run_stamp"):
        OmegaConf.register_new_resolver("jetmoe_run_stamp", run_stamp, use_cache=True)


def _plain_overrides(argv: list[str]) -> list[str] | None:
    """The overrides worth checking up front, or None when Hydra flags (--cfg, -m, ...) are present."""
    if any(a.startswith("-") for a in argv):
        return None
    return [a for a in argv if not a.lstrip("+~").startswith("hydra") or a.startswith("hydra.run.dir=")]


def check_overrides(argv: list[str]) -> None:
    """Compose once with the user's overrides so that a typo fails as one line, not Hydra's report."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from jetmoe.errors import JetMoEError

    overrides = _plain_overrides(argv)
    if overrides is None:
        return
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            run_dir = cfg.hydra.run.dir
            with open_dict(cfg):
                del cfg["hydra"]  # Hydra's own keys hold values only its run fills in
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        raise JetMoEError(f"bad override: {_one_line(e)} (list the keys with: python train/pretrain.py --cfg job)")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise JetMoEError(f"{', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line")
    from jetmoe.training.validate import check_values, check_writable

    check_values(cfg)
    if os.environ.get("RANK", "0") == "0":  # only rank 0 writes the run directory
        check_writable(run_dir)


def _one_line(e: BaseException) -> str:
    parts = []
    while e is not None:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()
                        and not line.strip().startswith(("full_key:", "object_type=", "reference_type=")))
        text = text.split(" Config search path:")[0]
        if text and "$VALUE" not in text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)


def main() -> None:
    sys.argv = [sys.argv[0]] + strip_local_rank(sys.argv[1:])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"  # say it, rather than have DeepSpeed warn that it guessed
    from jetmoe.errors import JetMoEError

    register()
    try:
        check_overrides(sys.argv[1:])
    except JetMoEError as e:
        _fail(e)
    if os.environ.get("RANK", "0") != "0":
        # Only rank 0 writes the run directory; the others keep Hydra's files and logs out of it.
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]

    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def app(cfg) -> None:
        from omegaconf import OmegaConf

        from jetmoe.training.failures import fail
        from jetmoe.training.trainer import run

        logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op-builder gcc chatter
        try:
            missing = sorted(OmegaConf.missing_keys(cfg))
            if missing:
                raise JetMoEError(f"{', '.join(missing)} must be set, e.g. {missing[0]}=... on the command line")
            run(cfg, HydraConfig.get().runtime.output_dir)
        except Exception as e:  # any rank: printed with its rank, peers told, the job ends (failures.py)
            fail(e)

    try:
        app()
    except KeyboardInterrupt:  # Ctrl-C before the trainer's handler is in place (start-up): nothing to save yet
        print("interrupted (SIGINT) before training started; nothing was saved", file=sys.stderr, flush=True)
        sys.exit(130)


def _fail(e: BaseException) -> None:
    rank = os.environ.get("RANK", "0")
    if rank == "0":
        print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
