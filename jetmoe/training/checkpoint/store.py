"""Checkpoint folders on disk: write, commit atomically, find, verify, read. No engine, no model.

A checkpoint is `<root>/step_<8 digits>/`. Its files are first written into a staging folder
`<root>/.step_<digits>.partial/`; when every writer has finished, the committing process writes
`manifest.json` (every file with its size and sha256) LAST, renames the staging folder into place, and
only then replaces `<root>/latest` (a one-line text file naming the folder) atomically. A folder without a
manifest, or whose files do not match it, is not a checkpoint. Killing any process at any moment
therefore leaves the previous checkpoint, and `latest` pointing at it, untouched.

Collectives go through a tiny `Comm` (rank, barrier, gather, broadcast) so this file runs without
torch.distributed in unit tests. Finding, verifying, pruning and reading committed folders: `folders`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger
from jetmoe.training.checkpoint import folders
from jetmoe.training.checkpoint.folders import FORMAT, LATEST, MANIFEST, VERSION, prune, read_latest, step_dir_name

logger = get_logger(__name__)
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview, digest=None) -> None:
    """Write and fsync, feeding `digest` (a hashlib object) with each chunk as it goes out (no read-back).
    The one place bytes reach the disk (tests patch it to simulate a full disk or a crash)."""
    with open(path, "wb") as f:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 26):
            chunk = view[start : start + (1 << 26)]
            f.write(chunk)
            if digest is not None:
                digest.update(chunk)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write_bytes(tmp, data)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------------- comm
class LocalComm:
    """The single-process Comm."""

    rank = 0
    world_size = 1

    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list | None:
        return [obj]

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_true(self, flag: bool) -> bool:
        return bool(flag)


class TorchComm:
    """Comm over the default torch.distributed group (objects travel pickled; they are small)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def barrier(self) -> None:
        self._dist.barrier()

    def gather(self, obj: Any) -> list | None:
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj)  # gloo has no gather_object on every version; all_gather is tiny here
        return out if self.rank == 0 else None

    def broadcast(self, obj: Any) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_true(self, flag: bool) -> bool:
        import torch

        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN)
        return bool(t.item())


def default_comm():
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return TorchComm()
    except ImportError:  # pragma: no cover
        pass
    return LocalComm()


# ------------------------------------------------------------------------------------------- writing
@dataclass
class FileRecord:
    name: str  # relative to the checkpoint folder, '/'-separated
    size: int
    sha256: str
    tensors: list[str] = field(default_factory=list)  # safetensors files: the keys inside
    parts: dict = field(default_factory=dict)  # fragment files: key -> [start, numel, whole shape]
    block: int = 0  # bytes per hashed block (0: none)
    blocks: list[str] = field(default_factory=list)  # sha256 of each block: a reader of a range verifies only it


def block_size(size: int) -> int:
    """About 64 blocks per file, 64 KiB to 16 MiB each: a rank reading part of a file verifies little more."""
    return min(16 << 20, max(64 << 10, -(-size // 64 // (64 << 10)) * (64 << 10)))


def block_hashes(data, block: int) -> list[str]:
    view = memoryview(data)
    return [hashlib.sha256(view[i : i + block]).hexdigest() for i in range(0, len(view), block)]


class CheckpointWriter:
    """Writes one checkpoint. Every rank constructs it (collective), writes its own files, then `commit`s
    (collective). A failure on any rank (e.g. a full disk) is carried to `commit`, which then removes the
    staging folder on every rank and raises the same JetMoEError everywhere, leaving older checkpoints alone."""

    def __init__(self, root: str | Path, step: int, comm=None, launch: str | None = None) -> None:
        """launch: a name the ranks of this launch agreed on once. With it the staging folder is
        `.step_XXXXXXXX.<launch>.partial`, which no crashed launch can have left, so each rank creates it as
        it writes and the constructor needs no collective (an async save's blocking part has none). Without
        it, rank 0 replaces a stale `.step_XXXXXXXX.partial` first (a broadcast)."""
        self.comm = comm or default_comm()
        self.root = Path(root)
        self.step = int(step)
        self.final = self.root / step_dir_name(self.step)
        self.staging = self.root / f".{step_dir_name(self.step)}{f'.{launch}' if launch else ''}.partial"
        self.records: list[FileRecord] = []
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self.write_s = 0.0  # seconds this rank spent serialising, writing, hashing and fsyncing
        if launch:
            return
        problem = None
        if self.comm.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if self.staging.exists():  # left by a crash: never complete, safe to drop
                    shutil.rmtree(self.staging)
                self.staging.mkdir()
            except OSError as e:
                problem = self._describe(e, self.staging)
        problem = self.comm.broadcast(problem)
        if problem:
            raise JetMoEError(problem)

    # -- per-rank writes (never raise for I/O: the error travels to commit so no rank hangs)
    def write_tensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None,
                      parts: dict | None = None) -> None:
        if self.error:
            return
        from safetensors.torch import save

        started = time.perf_counter()
        tensors = {k: (v() if callable(v) else v).detach().contiguous().cpu() for k, v in tensors.items()}
        data = save(tensors, metadata=metadata)
        self._write(name, data, sorted(tensors), parts)
        self.write_s += time.perf_counter() - started

    def _write(self, name: str, data: bytes, tensors: list[str], parts: dict | None = None) -> None:
        path = self.staging / name
        digest = hashlib.sha256()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, data, digest=digest)
        except OSError as e:
            self.error = self._describe(e, path)
            return
        block = block_size(len(data))
        self.records.append(FileRecord(name, len(data), digest.hexdigest(), tensors, parts or {}, block,
                                       block_hashes(data, block)))

    @property
    def bytes_written(self) -> int:
        return sum(r.size for r in self.records)

    # -- asynchronous writes: the files' tensors are already host copies; a thread writes them
    def write_in_background(self, jobs: list[tuple], first=None) -> None:
        """jobs: (name, tensors, metadata, parts) as for write_tensors; first: run before them in the same
        thread (e.g. host collectives that complete the tensors). `commit` waits for them."""

        def run():
            try:
                if first is not None:
                    first()
                for job in jobs:
                    self.write_tensors(*job)
            except BaseException as e:  # noqa: BLE001 (carried to commit, which raises it on every rank)
                self.error = self.error or f"checkpoint step {self.step} could not be written: {e!r}"

        self._thread = threading.Thread(target=run, name=f"checkpoint-{self.step}", daemon=True)
        self._thread.start()

    def writing(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _describe(self, e: OSError, path: Path) -> str:
        if e.errno in _DISK_FULL:
            what = "the disk is full (or a size/quota limit was hit)"
            fix = "free space or point checkpoint.dir at a larger disk"
        else:
            what = f"{e.strerror or e}"
            fix = "check that checkpoint.dir is writable"
        previous = read_latest(self.root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return f"checkpoint step {self.step} could not be written: {what} while writing {path}; {kept}; {fix}"

    # -- collective
    def commit(self, extra_files: dict[str, Any] | None = None, keep: int = 0, keep_every: int = 0,
               unknown: str = "verify", also_keep: Path | None = None) -> Path:
        """extra_files: name -> JSON object, written by rank 0 (indexes, trainer state). Returns the folder.
        Waits for this rank's background writes; publishes only when every rank's files are durable.
        keep, keep_every, unknown: then prune (folders.prune), which never removes this folder nor also_keep."""
        self.wait()
        gathered = self.comm.gather((self.error, self.records))
        problem = None
        if self.comm.rank == 0:
            errors = [err for err, _ in gathered if err]
            records = [r for _, recs in gathered for r in recs]
            if not errors:
                for name, obj in (extra_files or {}).items():
                    if callable(obj):
                        obj = obj(records)
                    self._write(name, _json_bytes(obj), [])
                    if self.error:
                        break
                if self.error:
                    errors.append(self.error)
                else:
                    records += [r for r in self.records if r.name in (extra_files or {})]
            if not errors:
                try:
                    self._publish(records)
                except OSError as e:
                    errors.append(self._describe(e, self.final))
            if errors:
                shutil.rmtree(self.staging, ignore_errors=True)
                problem = errors[0]
            else:
                prune(self.root, keep, keep_every, protect=(self.final, also_keep), unknown=unknown)
        problem = self.comm.broadcast(problem)
        if problem:
            raise JetMoEError(problem)
        return self.final

    def _publish(self, records: list[FileRecord]) -> None:
        names = [r.name for r in records]
        if len(set(names)) != len(names):
            raise RuntimeError(f"two writers wrote the same checkpoint file: {sorted(names)}")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "files": {r.name: {"size": r.size, "sha256": r.sha256, **({"block": r.block, "blocks": r.blocks} if r.block else {})}
                      for r in sorted(records, key=lambda r: r.name)},
        }
        _replace_atomically(self.staging / MANIFEST, _json_bytes(manifest))
        old = None
        if self.final.exists() and folders.verify(self.final):  # a damaged folder is kept, moved aside
            logger.info(f"checkpoint: {self.final} is damaged; moved aside to {folders.set_aside(self.final)}")
        if self.final.exists():  # the same step saved again (e.g. after falling back): swap it out
            old = self.root / f".{self.final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        folders.note_intact(self.final)
        _fsync_dir(self.root)
        _replace_atomically(self.root / LATEST, (self.final.name + "\n").encode())
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def tensor_index(records: Iterable[FileRecord], prefix: str) -> dict[str, str]:
    """name -> file, over safetensors files whose name starts with prefix."""
    return {t: r.name for r in records if r.name.startswith(prefix) for t in r.tensors}


