"""Where a user's relative paths point: the directory the command ran in, whatever Hydra does with the
working directory. Shared by data, checkpoints and the trainer (it sits below all of them)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional


def original_cwd() -> Path:
    """The directory the user launched from (Hydra may have been told to chdir into the run dir)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.utils import get_original_cwd

        if HydraConfig.initialized():
            return Path(get_original_cwd())
    except ImportError:
        pass
    return Path.cwd()


def resolve_user_path(path: str | Path) -> Path:
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else original_cwd() / p


def resolve_cache_dir(cache_dir: Optional[str]) -> Path:
    """data.cache_dir, else $JETMOE_CACHE_DIR, else ~/.cache/jetmoe."""
    if cache_dir:
        return resolve_user_path(cache_dir)
    env = os.environ.get("JETMOE_CACHE_DIR")
    if env:
        return resolve_user_path(env)
    return Path.home() / ".cache" / "jetmoe"
