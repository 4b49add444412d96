"""Composing the run config, the same way for every entry point (pretrain, pretokenize, plan, export_hf).

A user brings their own config files (say /my/conf/data/mydata.yaml, /my/conf/experiment/big.yaml) either way
Hydra knows:

    --config-dir /my/conf  (or -cd /my/conf)       hydra.searchpath=[file:///my/conf]

Both add the folder to the search path behind the built-in configs/, so `data=mydata` and `+experiment=big` find
the user's files in every command. --config-name (-cn) names another primary config: one in the user's folder
needs --config-dir (Hydra reads hydra.searchpath only after it has found the primary config).
`compose` composes once; any mistake (a misspelt key, a file Hydra cannot find, a folder that is not there)
is one JetMoEError line.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jetmoe.errors import JetMoEError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRIMARY = "config"
HINT = "list the keys with: python train/pretrain.py --cfg job"


@dataclass
class ConfigArgs:
    """A command line split into where the configs come from and the overrides."""

    overrides: list[str] = field(default_factory=list)
    config_dir: str | None = None
    config_name: str = PRIMARY
    others: list[str] = field(default_factory=list)  # other options (flags Hydra itself handles: -m, --cfg, ...)


def split_args(argv: list[str]) -> ConfigArgs:
    """Pick --config-dir/-cd DIR and --config-name/-cn NAME (also as --opt=value) out of argv."""
    out, i = ConfigArgs(), 0
    names = {"--config-dir": "config_dir", "-cd": "config_dir", "--config-name": "config_name", "-cn": "config_name"}
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in names and (eq or i + 1 < len(argv)):
            if not eq:
                i, value = i + 1, argv[i + 1]
            setattr(out, names[key], value)
        elif key in names:
            raise JetMoEError(f"{key} needs a value, e.g. {key} /path/to/your/configs")
        elif arg.startswith("-"):
            out.others.append(arg)
        else:
            out.overrides.append(arg)
        i += 1
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
    """The schema and the run-stamp resolver; call before composing configs/ (compose does)."""
    from jetmoe.training.config import register_configs

    register_configs()
    if not OmegaConf.has_resolver("jetmoe_run_stamp"):
        OmegaConf.register_new_resolver("jetmoe_run_stamp", run_stamp, use_cache=True)


@contextlib.contextmanager
def _hydra(config_dir: str | None):
    """Hydra initialised on configs/, with `config_dir` behind it as `--config-dir` puts it: on the search path
    before the primary config is looked up (a `hydra.searchpath` override joins only after that), as Hydra's own
    main does. `hydra.initialize_config_dir` takes one folder, so this builds the search path the same way."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    search_path = create_config_search_path(search_path_dir=str(CONFIG_DIR))
    if config_dir is not None:
        folder = Path(config_dir).expanduser().absolute()
        if not folder.is_dir():
            raise JetMoEError(f"--config-dir {config_dir} is not a directory; give the folder that holds your "
                              "data/, experiment/ (...) config files")
        search_path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="schema"))
    backup = get_gh_backup()
    version.setbase(None)
    Hydra.create_main_hydra2(task_name="app", config_search_path=search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def compose(argv: list[str], with_hydra: bool = False) -> DictConfig:
    """The composed config for this command line (Hydra's own `hydra` node kept with `with_hydra`).
    Raises JetMoEError, one line, for anything Hydra or OmegaConf refuses."""
    from hydra import compose as hydra_compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = split_args(argv)
    if args.others:
        raise JetMoEError(f"unknown option {args.others[0]}; this command takes --config-dir/-cd, "
                          "--config-name/-cn and Hydra overrides (key=value)")
    register()
    with _hydra(args.config_dir):
        try:
            return hydra_compose(config_name=args.config_name, overrides=args.overrides,
                                 return_hydra_config=with_hydra)
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            raise JetMoEError(f"bad override: {one_line(e)} ({HINT})") from None


def load(argv: list[str], needs: tuple[str, ...] | None = None):
    """The typed RunConfig of this command line, with every range and choice of the `needs` sections checked
    (default: all; their missing `???` keys are errors too). Raises JetMoEError, one line."""
    from jetmoe.training.config import SECTIONS, RunConfig

    needs = SECTIONS if needs is None else needs
    return RunConfig.from_composed(compose(argv), needs).check(needs)


def one_line(e: BaseException) -> str:
    """Hydra's and OmegaConf's report (its chain of causes) as one line, without their debugging lines."""
    parts = []
    while e is not None:
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()
                        and not line.strip().startswith(("full_key:", "object_type=", "reference_type=")))
        text = text.split(" Config search path:")[0]
        if text and "$VALUE" not in text and text not in parts:
            parts.append(text)
        e = e.__cause__ or e.__context__
    return ": ".join(parts)
