"""Print the resume line after a clean stop: `stopped.py STOP_FILE LAUNCHER [overrides...]`.

STOP_FILE is the JSON that the training's rank 0 writes once a stop signal's checkpoint has committed
(jetmoe/training/checkpoint/signals.py: report_stop); exit 1 when there is none (the job did not stop
cleanly). Standard library only: it runs in the launchers' shell."""

import json
import shlex
import sys


def main() -> int:
    path, launcher, *overrides = sys.argv[1:]
    try:
        with open(path) as f:
            stop = json.load(f)
    except (OSError, ValueError):
        return 1
    args = [a for a in overrides if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={stop['run_dir']}"]
    print(f"[{launcher}] stopped by {stop['signal']} after step {stop['step']}, checkpoint committed; "
          f"resume with: {shlex.join([*shlex.split(launcher), *args])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
