"""One job per run directory and per checkpoint directory: `lock_for_job(run_dir, is_rank0, checkpoints=...)`
on every rank (rank 0 takes the locks), `release()` when the run ends.

The lock is a file, `<run dir>/run.lock`, created with O_EXCL and holding its holder's host, pid, process
start time and Slurm job id, so that a refusal can name the holder. Only rank 0 takes it; the job's other
ranks follow rank 0's answer (all ranks of one job share the lock). A lock left by a process that died is
taken over with a message when its holder can be known dead: same host and that pid is gone (or is another
process now), or the same Slurm job id (a requeued job restarts on any node, its previous run is over).
A holder on another host is never presumed dead: the message says how to remove its lock.

The check-and-take runs under a flock on `run.lock.guard`, so two jobs finding the same stale lock cannot
both take it over. (A file, not only a flock, because the holder must be readable and the lock must
outlive a node that vanishes; py-filelock offers neither the holder record nor the stale takeover.)

The checkpoint directory gets the same lock (`checkpoint.lock`, recording the holder's run directory too): two
runs with their own run directories and one checkpoint.dir would otherwise resume from and overwrite each
other's checkpoints. A run whose checkpoint.dir is its default `<run dir>/checkpoints` takes it as well, so
that another run pointed there is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger

logger = get_logger(__name__)

LOCK = "run.lock"


@dataclass(frozen=True)
class Claim:
    """What a lock claims: its file, the folder's name in messages, the key that picks another folder."""

    file: str
    what: str
    key: str


RUN = Claim(LOCK, "run directory", "hydra.run.dir")
CHECKPOINTS = Claim("checkpoint.lock", "checkpoint directory", "checkpoint.dir")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid from its first owner)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    now = _start_ticks(pid)
    return start is None or now is None or now == start


def _me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start_ticks": _start_ticks(pid),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


class RunLock:
    def __init__(self, path: Path, holder: dict) -> None:
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, folder: str | Path, log=logger.info, claim: Claim = RUN,
                run_dir: str | Path | None = None) -> "RunLock":
        """Lock `folder` for this process; run_dir: the holder's run directory, named when another run is refused."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            guard = open(folder / f"{claim.file}.guard", "a")
        except OSError as e:
            raise JetMoEError(f"{claim.what} {folder} is not writable ({e.strerror}); "
                              f"pick another with {claim.key}=PATH") from None
        me, path = _me(), folder / claim.file
        if run_dir is not None:
            me["run_dir"] = str(Path(run_dir).absolute())
        with guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if path.exists():
                cls._take_over(path, me, log, claim)
            tmp = folder / f".{claim.file}.{me['pid']}"
            tmp.write_text(json.dumps(me) + "\n")
            try:
                os.link(tmp, path)  # fails if the lock exists: another host without a working flock got there
            except FileExistsError:
                raise JetMoEError(f"{claim.what} {folder} was just taken by another job; "
                                  f"pick another {claim.key}") from None
            finally:
                tmp.unlink(missing_ok=True)
        return cls(path, me)

    @staticmethod
    def _take_over(path: Path, me: dict, log, claim: Claim = RUN) -> None:
        try:
            holder = json.loads(path.read_text())
            host, pid = str(holder["host"]), int(holder["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            log(f"{claim.what} lock: {path} is unreadable; taking it over")
            path.unlink(missing_ok=True)
            return
        who = f"pid {pid} on {host} (since {holder.get('since', '?')})"
        if holder.get("run_dir") and holder["run_dir"] != me.get("run_dir"):
            who = f"the run in {holder['run_dir']} ({who})"
        same_job = me["slurm_job_id"] is not None and holder.get("slurm_job_id") == me["slurm_job_id"]
        if same_job or (host == me["host"] and not _alive(pid, holder.get("start_ticks"))):
            why = "the same Slurm job, restarted" if same_job else "that process is gone"
            log(f"{claim.what} lock: taking over the lock of {who}: {why}")
            path.unlink(missing_ok=True)
            return
        if host == me["host"]:
            raise JetMoEError(f"{claim.what} {path.parent} is in use by {who}; wait for it to end or pick "
                              f"another {claim.key}")
        raise JetMoEError(f"{claim.what} {path.parent} is in use by {who}; pick another {claim.key}, or delete "
                          f"{path} if that job is gone")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        try:
            if json.loads(self.path.read_text()).get("pid") == self.holder["pid"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass


class JobLocks:
    """The locks rank 0 holds for the job (none on other ranks)."""

    def __init__(self, locks: list[RunLock]) -> None:
        self.locks = locks

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()


def lock_for_job(run_dir: str | Path, is_rank0: bool, checkpoints: str | Path | None = None) -> JobLocks:
    """Collective: rank 0 takes the run directory's lock, then checkpoint directory's (`checkpoints`), for the
    whole job; every rank raises the same error if it cannot (and a lock taken before the refusal is let go)."""
    locks, problem = [], None
    if is_rank0:
        try:
            locks.append(RunLock.acquire(run_dir))
            if checkpoints is not None:
                locks.append(RunLock.acquire(checkpoints, claim=CHECKPOINTS, run_dir=run_dir))
        except JetMoEError as e:
            problem = str(e)
            JobLocks(locks).release()
            locks = []
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise JetMoEError(problem)
    return JobLocks(locks)
