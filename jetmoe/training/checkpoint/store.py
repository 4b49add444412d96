"""Checkpoint folders on disk: write, commit atomically, find, verify, read. No engine, no model.

A checkpoint is `<root>/step_<8 digits>/`. Its files are first written into a staging folder
`<root>/.step_<digits>.partial/`; when every writer has finished, the committing process writes
`manifest.json` (every file with its size and sha256) LAST, renames the staging folder into place, and
only then replaces `<root>/latest` (a one-line text file naming the folder) atomically. A folder without a
manifest, or whose files do not match it, is not a checkpoint. Killing any process at any moment
therefore leaves the previous checkpoint, and `latest` pointing at it, untouched.

Collectives go through a tiny `Comm` (rank, barrier, gather, broadcast) so this file runs without
torch.distributed in unit tests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from jetmoe.errors import JetMoEError

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "jetmoe-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes | memoryview) -> None:
    """Write and fsync; the one place bytes reach the disk (tests patch it to simulate a full disk)."""
    with open(path, "wb") as f:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 26):
            f.write(view[start : start + (1 << 26)])
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


class CheckpointWriter:
    """Writes one checkpoint. Every rank constructs it (collective), writes its own files, then `commit`s
    (collective). A failure on any rank (e.g. a full disk) is carried to `commit`, which then removes the
    staging folder on every rank and raises the same JetMoEError everywhere, leaving older checkpoints alone."""

    def __init__(self, root: str | Path, step: int, comm=None) -> None:
        self.comm = comm or default_comm()
        self.root = Path(root)
        self.step = int(step)
        self.final = self.root / step_dir_name(self.step)
        self.staging = self.root / f".{step_dir_name(self.step)}.partial"
        self.records: list[FileRecord] = []
        self.error: str | None = None
        self.extra: dict[str, Any] = {}  # JSON files rank 0 writes at commit (name -> object or f(records))
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
    def write_tensors(self, name: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        if self.error:
            return
        from safetensors.torch import save

        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        data = save(tensors, metadata=metadata)
        self._write(name, data, sorted(tensors))

    def write_json(self, name: str, obj: Any) -> None:
        if self.error:
            return
        self._write(name, _json_bytes(obj), [])

    def _write(self, name: str, data: bytes, tensors: list[str]) -> None:
        path = self.staging / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, data)
        except OSError as e:
            self.error = self._describe(e, path)
            return
        self.records.append(FileRecord(name, len(data), hashlib.sha256(data).hexdigest(), tensors))

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
    def commit(self, extra_files: dict[str, Any] | None = None, keep: int = 0) -> Path:
        """extra_files: name -> JSON object, written by rank 0 (indexes, trainer state). Returns the folder."""
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
                prune(self.root, keep)
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
            "files": {r.name: {"size": r.size, "sha256": r.sha256} for r in sorted(records, key=lambda r: r.name)},
        }
        _replace_atomically(self.staging / MANIFEST, _json_bytes(manifest))
        old = None
        if self.final.exists():  # the same step saved again (e.g. after falling back): swap it out
            old = self.root / f".{self.final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
        os.replace(self.staging, self.final)
        _fsync_dir(self.root)
        _replace_atomically(self.root / LATEST, (self.final.name + "\n").encode())
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def tensor_index(records: Iterable[FileRecord], prefix: str) -> dict[str, str]:
    """name -> file, over safetensors files whose name starts with prefix."""
    return {t: r.name for r in records if r.name.startswith(prefix) for t in r.tensors}


# ------------------------------------------------------------------------------- finding, verifying
def read_latest(root: str | Path) -> str | None:
    try:
        return (Path(root) / LATEST).read_text().strip() or None
    except OSError:
        return None


def list_checkpoints(root: str | Path) -> list[Path]:
    """Folders with a manifest (committed), newest step first. Not yet verified."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / MANIFEST).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found, reverse=True)]


def load_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise JetMoEError(f"{folder} is not a complete checkpoint (no {MANIFEST}); pass a step folder written by training")
    except (OSError, ValueError) as e:
        raise JetMoEError(f"{path} is unreadable ({e}); pass another checkpoint")
    if manifest.get("format") != FORMAT:
        raise JetMoEError(f"{path} is not a jetmoe checkpoint manifest; pass a step folder written by training")
    return manifest


def verify(folder: str | Path, hashes: bool = True) -> list[str]:
    """Problems found (empty = intact): missing, truncated or altered files, each named."""
    folder = Path(folder)
    try:
        manifest = load_manifest(folder)
    except JetMoEError as e:
        return [str(e)]
    problems = []
    for name, meta in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != meta["size"]:
            problems.append(f"{path} is truncated or altered ({size} bytes, manifest says {meta['size']})")
        elif hashes and sha256_file(path) != meta["sha256"]:
            problems.append(f"{path} is altered (sha256 differs from the manifest)")
    return problems


def resolve(spec: str | None, root: str | Path | None, hashes: bool = True, log=print) -> Path | None:
    """The checkpoint folder to resume from, verified.

    spec: "none" -> None; "auto" -> newest intact checkpoint under root (None if there is none; a damaged
    one is reported and skipped); a path -> that step folder, or the newest intact one under a root folder
    (a damaged explicit step folder is an error naming the file)."""
    spec = "none" if spec is None else str(spec)
    if spec.lower() in ("none", "false", "no", ""):
        return None
    if spec.lower() == "auto":
        return _newest_intact(Path(root), hashes, log) if root is not None else None
    path = Path(spec).expanduser()
    if not path.exists():
        raise JetMoEError(f"checkpoint.resume={spec}: no such folder; pass a checkpoint folder, 'auto' or 'none'")
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        problems = verify(path, hashes)
        if problems:
            raise JetMoEError(f"checkpoint {path} is damaged: {problems[0]}; pass an earlier checkpoint")
        return path
    found = _newest_intact(path, hashes, log)
    if found is None:
        raise JetMoEError(f"checkpoint.resume={spec}: no complete checkpoint in that folder; pass a step folder")
    return found


def _newest_intact(root: Path, hashes: bool, log) -> Path | None:
    latest = read_latest(root)
    candidates = list_checkpoints(root)
    if latest and not (root / latest / MANIFEST).is_file():
        log(f"checkpoint: 'latest' names {latest}, which is not a complete checkpoint; looking for older ones")
    for i, folder in enumerate(candidates):
        problems = verify(folder, hashes)
        if not problems:
            return folder
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        then = f"falling back to {nxt}" if nxt else "no older checkpoint to fall back to"
        log(f"checkpoint: {folder.name} is damaged ({'; '.join(problems)}); {then}")
    return None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` committed checkpoints (keep <= 0: keep all) and stale staging folders."""
    root = Path(root)
    removed = []
    if keep > 0:
        for folder in list_checkpoints(root)[keep:]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith(".step_") and child.name.endswith((".partial", ".old")):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


# ------------------------------------------------------------------------------------------- reading
class CheckpointReader:
    """Lazy access to a committed checkpoint's tensors and JSON files."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder)
        self.step = int(self.manifest["step"])
        self._handles: dict[str, Any] = {}

    def json(self, name: str) -> Any:
        return json.loads((self.folder / name).read_text())

    def has(self, name: str) -> bool:
        return name in self.manifest["files"]

    def _open(self, file: str):
        from safetensors import safe_open

        if file not in self._handles:
            self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return self._handles[file]

    def tensor(self, file: str, key: str, rows: slice | None = None):
        """A tensor, or only rows [start:stop] of its first dim (an expert shard) without reading the rest."""
        handle = self._open(file)
        if rows is None:
            return handle.get_tensor(key)
        return handle.get_slice(key)[rows.start : rows.stop]

    def shape(self, file: str, key: str) -> list[int]:
        return self._open(file).get_slice(key).get_shape()

    def close(self) -> None:
        self._handles.clear()
