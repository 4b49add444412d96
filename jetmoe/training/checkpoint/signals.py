"""SIGTERM / SIGINT (Ctrl-C) / SIGUSR1 (Slurm's pre-emption warning) -> finish the current step,
checkpoint, exit 0. A second SIGINT ends the process at once (exit 130), without a traceback.

The handler only sets a flag; the loop asks `requested()` at each step boundary, which ORs the flag
over all ranks (one tiny all-reduce), so every rank stops after the same step even when only some
of them received the signal."""

from __future__ import annotations

import os
import signal
import sys
import threading

from jetmoe.log import EVERY_RANK, get_logger
from jetmoe.training import early_stop

logger = get_logger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignal:
    def __init__(self, signals=STOP_SIGNALS) -> None:
        self.received: int | None = None
        self.interrupts = 0
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            early, before = early_stop.take_over()  # a stop asked for during start-up (jetmoe.training.early_stop)
            self._previous.update((sig, h) for sig, h in before.items() if sig in self._previous)
            self.received = early

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.interrupts:
            logger.error("second SIGINT: exiting now, without a checkpoint of this step", extra=EVERY_RANK)
            os._exit(130)
        self.interrupts += signum == signal.SIGINT
        self.received = self.received or signum

    def requested(self) -> bool:
        """True on every rank once any rank got a stop signal (collective when distributed)."""
        signum = self.received or 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            import torch

            t = torch.tensor([signum], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            signum = int(t.item())
        if signum and self.received is None:
            self.received = signum  # a peer's signal: name it in messages
        return bool(signum)

    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "no signal"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


STOP_FILE_ENV = "JETMOE_STOP_FILE"  # set by launch/*.sh: where rank 0 reports a clean stop (JSON)


def resume_command(run_dir) -> str:
    """The command that continues this run: the same overrides, with this run directory."""
    import shlex

    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    return shlex.join(["python", "train/pretrain.py", *args, f"hydra.run.dir={run_dir}"])


def report_stop(signal_name: str, step: int, folder, run_dir) -> str | None:
    """Rank 0, after the stop checkpoint committed: the line to print, or None when a launcher asked for
    the report in its file (it prints its own resume command)."""
    import json

    path = os.environ.get(STOP_FILE_ENV)
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"signal": signal_name, "step": step, "checkpoint": str(folder), "run_dir": str(run_dir)}, f)
            return None
        except OSError:
            pass
    return f"stopped by {signal_name} after step {step}; checkpoint {folder} committed; resume with: " \
           f"{resume_command(run_dir)}"
