"""One daemon thread per rank that watches the training loop from outside it.

- Peer failure: every `poll_s` it looks in the job's store for a failure another rank recorded
  (jetmoe.training.failures) and, finding one, ends this rank at once with one line naming that rank.
  A peer blocked in a collective (NCCL never notices a dead peer) thus leaves within seconds instead of
  at parallel.timeout_s.
- Stall: when the loop reports no progress for `stall_warn_s` (train.stall_warn_s; 0 = off), it prints
  the step, the phase and this rank's main-thread stack, once per stall. Every rank does so, so the
  console shows what each rank was doing (the stuck one in its own code, its peers in the collective
  that waits for it).

The loop calls `progress(step, phase)` when a step (or phase) starts and `stop()` at the end.
Collectives release the GIL, so this thread runs while the main thread waits in one.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from typing import Callable

from jetmoe.log import EVERY_RANK, get_logger
from jetmoe.training import failures

logger = get_logger(__name__)


class Watchdog:
    def __init__(self, rank: int, stall_warn_s: float, store=None, poll_s: float = 1.0,
                 on_peer_failure: Callable[[str], None] | None = None, out=None):
        self.rank = rank
        self.stall_warn_s = float(stall_warn_s or 0)
        self.store = store
        self.poll_s = poll_s
        self.on_peer_failure = on_peer_failure or _leave
        self.out = out or sys.stderr
        self._main = threading.main_thread()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._step, self._phase, self._since, self._reported = 0, "setup", time.monotonic(), True
        self._thread: threading.Thread | None = None
        self.polls = 0  # checks made so far (tests wait on it instead of sleeping)

    @classmethod
    def for_job(cls, rank: int, stall_warn_s: float) -> "Watchdog":
        """Started on the job's store (None in a single process: then only the stall check runs)."""
        return cls(rank, stall_warn_s, store=failures.job_store()).start()

    def start(self) -> "Watchdog":
        if self.store is not None or self.stall_warn_s > 0:
            self._thread = threading.Thread(target=self._run, name="jetmoe-watchdog", daemon=True)
            self._thread.start()
        return self

    def progress(self, step: int, phase: str = "train_step") -> None:
        """The loop moved on: `phase` of `step` starts now."""
        with self._lock:
            self._step, self._phase, self._since, self._reported = step, phase, time.monotonic(), False

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.poll_s + 1)

    # ------------------------------------------------------------------------------------ the thread
    def _run(self) -> None:
        store_errors = 0
        while not self._stop.wait(self.poll_s):
            if self.store is not None:
                try:
                    peer = failures.failed_peer(self.store)
                    store_errors = 0
                except Exception as e:  # twice in a row: the store's host (torchrun agent or rank 0) is gone
                    store_errors += 1
                    peer = (None, f"the job's store is unreachable ({type(e).__name__}); the launcher or rank 0 died") \
                        if store_errors >= 2 else None
                if peer is not None and peer[0] != self.rank:
                    who = f"rank {peer[0]} failed: " if peer[0] is not None else ""
                    self.on_peer_failure(f"rank {self.rank}: stopping because {who}{peer[1]}")
                    return
            self._check_stall()
            self.polls += 1

    def _check_stall(self) -> None:
        if self.stall_warn_s <= 0:
            return
        with self._lock:
            waited = time.monotonic() - self._since
            if self._reported or waited < self.stall_warn_s:
                return
            self._reported = True
            step, phase = self._step, self._phase
        frame = sys._current_frames().get(self._main.ident)
        stack = traceback.format_stack(frame) if frame is not None else ["  (main thread has ended)\n"]
        lines = [f"stall: no progress for {waited:.0f}s in step {step} ({phase}); this rank is at:\n"]
        lines += [line + "\n" for chunk in stack for line in chunk.rstrip("\n").splitlines()]
        self.out.write("".join(f"[rank {self.rank}] {line}" for line in lines))
        self.out.flush()


def _leave(message: str) -> None:
    logger.error(message, extra=EVERY_RANK)
    failures._exit(1)
