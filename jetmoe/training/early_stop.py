"""A stop signal that arrives during start-up is kept until the trainer's handler takes it over.

`record_stops()` runs first thing in train/pretrain.py. Until the trainer's StopSignal exists (minutes at scale:
data, engine, checkpoint load), SIGTERM would kill the process with no message and leave run.lock behind, and
SIGUSR1 (Slurm's time-limit warning) would be lost: launch/torchrun.sh's agent ignores it and its workers inherit
that. Here both are recorded instead; `take_over()` hands the first one recorded to StopSignal (which installs
its own handlers first, so that nothing falls between the two), and the run stops
at its first step boundary with a checkpoint, as for a signal received while training, and exits 0.

SIGINT keeps Python's KeyboardInterrupt during start-up: a Ctrl-C at a terminal ends the start-up at once.
Imports nothing heavy (no torch), so that the handlers are in place a fraction of a second after the process starts.
"""

from __future__ import annotations

import signal
import threading

from jetmoe.log import get_logger  # logging only: no import inside the handler, which may run mid-import

logger = get_logger(__name__)

RECORDED = (signal.SIGTERM, signal.SIGUSR1)

_recorded: int | None = None
_previous: dict = {}


def _record(signum, frame) -> None:
    global _recorded
    if _recorded is None:
        _recorded = signum
        logger.info(f"{signal.Signals(signum).name} received during start-up: the run stops after its "
                    "first step, with a checkpoint")


def record_stops() -> None:
    """Record SIGTERM and SIGUSR1 from now until `take_over()` (main thread only; once)."""
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for sig in RECORDED:
        _previous[sig] = signal.signal(sig, _record)


def take_over() -> tuple[int | None, dict]:
    """(the stop signal recorded so far or None, each recorded signal's disposition from before `record_stops`).
    Call it once the caller's own handlers are in place: a signal arriving in between is then never lost."""
    global _recorded
    signum, previous, _recorded = _recorded, dict(_previous), None
    _previous.clear()
    return signum, previous
