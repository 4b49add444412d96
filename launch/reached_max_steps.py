"""Exit 0 if the run in RUN_DIR logged its last step (train.max_steps), 1 if it stopped before.

launch/slurm.sbatch asks this after a SIGUSR1, so that a run which finished anyway is not requeued.
"""

import json
import sys
from pathlib import Path


def last_step(metrics: Path) -> int:
    step = 0
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return step


def main(run_dir: str) -> int:
    from omegaconf import OmegaConf

    config = Path(run_dir) / "config.yaml"
    if not config.exists():
        return 1
    max_steps = int(OmegaConf.load(config).train.max_steps)
    return 0 if last_step(Path(run_dir) / "metrics.jsonl") >= max_steps else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
