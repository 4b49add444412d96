"""What a run directory says about the runs that wrote it: `config.yaml` (the config of the latest launch)
and `configs/launch-<n>.yaml` (one per launch, so a resumed run shows what each segment ran with).
Written by rank 0 only after every check passed (config, data, resume), so a launch that is refused
leaves the directory describing its checkpoints."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf


def record_config(run_dir: str | Path, resolved: dict, resumed_step: int) -> Path:
    """resolved: the run's config, every key resolved (RunConfig.resolved)."""
    run_dir = Path(run_dir)
    text = OmegaConf.to_yaml(OmegaConf.create(resolved))
    launches = run_dir / "configs"
    launches.mkdir(parents=True, exist_ok=True)
    n = 1 + max((int(p.stem.split("-")[1]) for p in launches.glob("launch-*.yaml")
                 if p.stem.split("-")[1].isdigit()), default=0)
    header = (f"# launch {n} at {time.strftime('%Y-%m-%d %H:%M:%S')}, starting after step {resumed_step}\n"
              f"# command: {shlex.join(sys.argv)}\n")
    path = launches / f"launch-{n}.yaml"
    path.write_text(header + text)
    (run_dir / "config.yaml").write_text(text)
    return path
