"""Committed checkpoint folders: find the newest intact one, verify against the manifest, prune.

A folder counts only once its manifest exists (store.CheckpointWriter writes it last); `latest` names the
newest committed folder but is only a hint: a missing, unreadable or garbled pointer falls back to a scan.

Damaged folders are never deleted or overwritten: `prune` counts only intact checkpoints and leaves damaged
ones where they are; a damaged folder in the way of a new save of the same step is moved aside (`set_aside`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

from jetmoe.errors import JetMoEError
from jetmoe.log import get_logger

logger = get_logger(__name__)

MANIFEST = "manifest.json"
LATEST = "latest"
FORMAT = "jetmoe-checkpoint"
# 1: whole tensors; 2: optimizer state as per-rank flat fragments (optimizer/index.json lists parts);
# 3: bf16 runs store bf16 weight files and their fp32 masters as fragments (optimizer/master-*)
VERSION = 3
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_latest(root: str | Path) -> str | None:
    """The folder name `latest` holds, or None when it is missing, unreadable or not a step folder's name."""
    try:
        name = (Path(root) / LATEST).read_text().strip()
    except (OSError, ValueError):  # ValueError: random bytes (UnicodeDecodeError)
        return None
    return name if _STEP_DIR.match(name) else None


def checkpoint_root(settings, run_dir: str | Path) -> Path:
    """The folder checkpoints go to: checkpoint.dir (a relative path is the user's working directory's),
    else <run dir>/checkpoints."""
    from jetmoe.paths import resolve_user_path

    return resolve_user_path(settings.dir) if settings.dir else Path(run_dir) / "checkpoints"


def check_writable(root: str | Path) -> None:
    """Before step 1: raise the one-line error if checkpoints could not be written under `root` (read-only,
    a file in the way, no permission). Probes the folder, or the nearest existing folder above it, with a
    file created and removed at once; creates nothing else."""
    root = Path(root)
    probe_in = root
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    try:
        if not probe_in.is_dir():
            raise NotADirectoryError(f"{probe_in} is a file")
        fd, name = tempfile.mkstemp(prefix=".write-check-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise JetMoEError(f"checkpoint.dir {root} is not writable ({e.strerror or e}); make it writable or point "
                          "checkpoint.dir at a folder this job can write") from None


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
    if int(manifest.get("version", 1)) > VERSION:
        raise JetMoEError(f"{folder} was written by a newer jetmoe (checkpoint format {manifest['version']}, this "
                          f"one reads up to {VERSION}); upgrade jetmoe to load it")
    return manifest


# What this process learnt about folders (rank 0 resolves, commits and prunes): a folder it committed is
# intact, one whose hashes it checked is known either way. Lets `prune` avoid re-reading every byte.
_KNOWN: dict[Path, bool] = {}


def note_intact(folder: str | Path) -> None:
    """A folder this process has just committed (its hashes were computed from the bytes written)."""
    _KNOWN[Path(folder).resolve()] = True


def forget(folder: str | Path) -> None:
    """Drop what this process learnt about a folder (it is about to move)."""
    _KNOWN.pop(Path(folder).resolve(), None)


def verify(folder: str | Path, hashes: bool = True) -> list[str]:
    """Problems found (empty = intact): missing, truncated or altered files, each named."""
    folder = Path(folder)
    problems = _problems(folder, hashes)
    if problems:
        _KNOWN[folder.resolve()] = False
    elif hashes:
        _KNOWN[folder.resolve()] = True
    return problems


def _problems(folder: Path, hashes: bool) -> list[str]:
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


def verify_in_background(root: str | Path) -> threading.Thread:
    """Hash-verify, in a daemon thread, the checkpoints under `root` this process knows nothing about (those
    of earlier launches), so that prune(unknown="skip") can count and delete them later."""

    def run():
        for folder in list_checkpoints(root):
            if _KNOWN.get(folder.resolve()) is None:
                verify(folder)

    thread = threading.Thread(target=run, name="checkpoint-verify", daemon=True)
    thread.start()
    return thread


def resolve(spec: str | None, root: str | Path | None, hashes: bool = True, log=logger.info) -> Path | None:
    """The checkpoint folder to resume from, verified.

    spec: "none" -> None; "auto" -> newest intact checkpoint under root (None if there is none; a damaged
    one is reported and skipped); a path -> that step folder, or the newest intact one under a root folder
    (a damaged explicit step folder is an error naming the file)."""
    spec = "none" if spec is None else str(spec)
    if spec.lower() in ("none", "false", "no", ""):
        return None
    if spec.lower() == "auto":
        if root is None:
            return None
        found = _newest_intact(Path(root), hashes, log)
        if found is None and list_checkpoints(root):
            raise every_checkpoint_damaged(root)
        return found
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
        damaged = list_checkpoints(path)
        what = f"every checkpoint there is damaged ({_names(damaged)})" if damaged else "no complete checkpoint in that folder"
        raise JetMoEError(f"checkpoint.resume={spec}: {what}; pass a step folder")
    return found


def _names(found: list[Path]) -> str:
    return ", ".join(p.name for p in found)


def every_checkpoint_damaged(root: str | Path) -> JetMoEError:
    """The error of a `checkpoint.resume=auto` that found checkpoints but none intact: it names them and the
    user's two ways on (the trainer never deletes or overwrites them)."""
    return JetMoEError(f"checkpoint.resume=auto: every checkpoint in {root} is damaged "
                       f"({_names(list_checkpoints(root))}; left untouched): checkpoint.resume=PATH resumes from a "
                       "folder you choose; to start over, pick a new run directory (hydra.run.dir=...) or pass "
                       "checkpoint.resume=none checkpoint.fresh_start=move_aside (moves them into previous-<n>/)")


def _newest_intact(root: Path, hashes: bool, log) -> Path | None:
    latest = read_latest(root)
    candidates = list_checkpoints(root)
    if (root / LATEST).exists() and latest is None:
        log(f"checkpoint: {root / LATEST} is unreadable; looking for the newest intact checkpoint")
    elif latest and not (root / latest / MANIFEST).is_file():
        log(f"checkpoint: 'latest' names {latest}, which is not a complete checkpoint; looking for older ones")
    for i, folder in enumerate(candidates):
        problems = verify(folder, hashes)
        if not problems:
            return folder
        nxt = candidates[i + 1].name if i + 1 < len(candidates) else None
        then = f"falling back to {nxt}" if nxt else "no older checkpoint to fall back to"
        log(f"checkpoint: {folder.name} is damaged ({'; '.join(problems)}); {then}")
    return None


def prune(root: str | Path, keep: int, keep_every: int = 0, hashes: bool = True,
          protect=None, unknown: str = "verify") -> list[Path]:
    """Keep the newest `keep` intact checkpoints (keep <= 0: keep all), those whose step is a multiple of
    `keep_every` (> 0: kept forever, e.g. for annealing branches) and `protect` (a folder or several: the one
    just committed, the trainer's newest of a finite step); delete older intact ones and stale staging folders. Damaged folders neither count nor are
    deleted, so the newest intact checkpoint always stays, and checkpoints newer than the one a run resumed
    from outlive that run's saves until `keep` newer intact ones exist.

    A folder this process neither wrote nor checked is verified once (`hashes`: every byte read) before it
    counts or is deleted; its verdict is remembered for later saves. unknown="skip" leaves such folders
    for a later prune instead (neither counted nor deleted: more are kept, never fewer), for a trainer whose
    verify_in_background is reading them, so a commit never waits for ~100 GB of old checkpoints."""
    root = Path(root)
    protect = [protect] if isinstance(protect, (str, Path)) else list(protect or ())
    protect = {Path(p).resolve() for p in protect if p is not None}
    removed = []
    if keep > 0:
        intact = 0
        for folder in list_checkpoints(root):
            key = folder.resolve()
            known = _KNOWN.get(key)
            if known is None:
                if unknown == "skip":
                    continue
                known = not verify(folder, hashes)
            if not known:
                continue
            if intact < keep or key in protect:
                intact += 1
                continue
            if keep_every > 0 and int(_STEP_DIR.match(folder.name).group(1)) % keep_every == 0:
                continue
            trash = root / f".{folder.name}.pruned"  # renamed first: a kill mid-delete leaves no half checkpoint
            shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(folder, trash)
            except OSError:  # kept rather than failing the commit (other ranks wait on it)
                continue
            shutil.rmtree(trash, ignore_errors=True)
            _KNOWN.pop(key, None)
            removed.append(folder)
    for child in root.iterdir() if root.is_dir() else []:
        if child.name.startswith(".step_") and child.name.endswith((".partial", ".old", ".pruned")):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def set_aside(folder: str | Path) -> Path:
    """Move a damaged folder out of the way of a new save of its step, keeping its bytes:
    step_XXXXXXXX -> step_XXXXXXXX.damaged (numbered if taken). Returns the new path."""
    folder = Path(folder)
    _KNOWN.pop(folder.resolve(), None)
    target, n = folder.with_name(f"{folder.name}.damaged"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged-{n}")
    folder.rename(target)
    return target
