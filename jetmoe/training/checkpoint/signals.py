"""SIGTERM / SIGUSR1 (Slurm's pre-emption warning) -> finish the current step, checkpoint, exit 0.

The handler only sets a flag; the loop asks `requested()` at each step boundary, which ORs the flag
over all ranks (one tiny all-reduce), so every rank stops after the same step even when only some
of them received the signal."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    def __init__(self, signals=STOP_SIGNALS) -> None:
        self.received: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

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
