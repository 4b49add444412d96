"""A failure on any rank ends the whole job within seconds, with that rank's message first.

`fail(exc)` is called by the entry point for any exception that escapes the run. It prints the error with
its rank, records "rank<TAB>message" under FAILED_KEY in the job's c10d store (the first rank to fail
wins), and leaves at once with os._exit: no interpreter teardown that could block in a collective.
Peers learn of it from the store (jetmoe.training.watchdog polls it) or from their own failing
collective; either way they print one line naming the failed rank, not a second traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

from jetmoe.errors import JetMoEError
from jetmoe.log import EVERY_RANK, get_logger

logger = get_logger(__name__)

# torchrun restarts workers against the same store: each attempt has its own key
FAILED_KEY = f"jetmoe/failed/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def job_store():
    """The default process group's store (hosted by torchrun's agent, or rank 0), or None when single-process."""
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        return _get_default_store()
    except Exception:  # no distributed build, or torch moved the private accessor: fall back to local reports
        return None


def this_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def failed_peer(store) -> tuple[int, str] | None:
    """(rank, message) of the rank that failed first, when one did."""
    if store is None or not store.check([FAILED_KEY]):
        return None
    rank, _, message = store.get(FAILED_KEY).decode(errors="replace").partition("\t")
    return int(rank), message


def _claim(store, rank: int, message: str) -> tuple[int, str]:
    """Record this rank's failure unless another rank's is already there; the first one recorded."""
    try:
        first = store.compare_set(FAILED_KEY, "", f"{rank}\t{message}").decode(errors="replace")
        other, _, text = first.partition("\t")
        return int(other), text
    except Exception:  # the store's host is gone: this rank reports for itself
        return rank, message


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def fail(exc: BaseException) -> None:
    """Report `exc` for this rank and end the process (exit 2 for a user error, 1 otherwise)."""
    rank, store = this_rank(), job_store()
    code = 2 if isinstance(exc, JetMoEError) else 1
    summary = str(exc) if isinstance(exc, JetMoEError) else f"{type(exc).__name__}: {exc}"
    summary = " ".join(summary.split())
    if store is None:  # single process, or not yet connected: every rank fails alike, rank 0 speaks
        if isinstance(exc, JetMoEError):
            if rank == 0:
                logger.error(f"error: {summary}")
            _exit(code)
        raise exc
    first, message = _claim(store, rank, summary)
    if first != rank:
        if message != summary:  # a consequence (a closed connection) or the same error elsewhere: one line
            logger.error(f"rank {rank}: stopping because rank {first} failed: {message}", extra=EVERY_RANK)
        _exit(code)
    if not isinstance(exc, JetMoEError):
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        sys.stderr.write("".join(f"[rank {rank}] {line}" for chunk in lines for line in chunk.splitlines(True)))
    logger.error(f"error (rank {rank}): {summary}", extra=EVERY_RANK)
    _exit(code)
