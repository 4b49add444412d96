"""Build a cache directory exactly once across processes, ranks and (with a shared filesystem) nodes.

The first process to take an exclusive file lock builds into a private temporary directory and renames
it into place; the others block on the lock, then find the finished directory. No torch.distributed
is involved, so this works before or without process groups. On a shared filesystem without working
locks (some Lustre mounts), fill the cache first with train/pretokenize.py.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from jetmoe.errors import JetMoEError


DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _disk_full(final_dir: Path, needed_bytes: Optional[int]) -> JetMoEError:
    free = shutil.disk_usage(final_dir.parent).free
    need = f"about {needed_bytes / 2**30:.1f} GiB needed, " if needed_bytes else ""
    return JetMoEError(f"the disk holding the data cache {final_dir.parent} is full ({need}{free / 2**30:.1f} GiB free); "
                       "free space or set data.cache_dir to a larger disk (the partial cache was removed)")


def build_once(final_dir: Path, build: Callable[[Path], None], log: Optional[Callable[[str], None]] = None,
               needed_bytes: Optional[int] = None) -> bool:
    """Make sure `final_dir` exists, calling `build(tmp_dir)` to fill it if nobody has. True if we built it.
    `needed_bytes`: an estimate of the cache's size, named when the disk fills up."""
    if final_dir.is_dir():
        return False
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(final_dir.parent / f"{final_dir.name}.lock", "a")
    except OSError as e:
        raise JetMoEError(f"cannot write the data cache at {final_dir.parent} ({e.strerror}); set data.cache_dir") from None
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting for another process to build {final_dir}")
            start = time.monotonic()
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            if log:
                log(f"waited {time.monotonic() - start:.1f}s for {final_dir.name}")
        if final_dir.is_dir():
            return False
        for stale in final_dir.parent.glob(f".{final_dir.name}.tmp-*"):  # left by a killed builder
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            os.rename(tmp, final_dir)
        except OSError as e:
            if e.errno in DISK_FULL:
                shutil.rmtree(tmp, ignore_errors=True)
                raise _disk_full(final_dir, needed_bytes) from None
            if not final_dir.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else's rename won (locks not honoured here)
            return False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True
