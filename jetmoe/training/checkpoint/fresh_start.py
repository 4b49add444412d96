"""A fresh start never overwrites or prunes an earlier launch's checkpoints or metrics.

`prepare(...)` runs on rank 0 when a launch resumes nothing. A run directory that holds committed checkpoints
(intact or damaged) is refused with `checkpoint.resume=none` unless `checkpoint.fresh_start=move_aside`, which
moves them into `<checkpoint dir>/previous-<n>/` and the run's rows (metrics.jsonl, samples.jsonl, the wandb run
id, tensorboard/) into `<run dir>/previous-<n>/`. An auto resume that finds no checkpoint but rows of an earlier
launch (one killed before its first save) has nothing to continue: those rows are moved aside the same way, so a
requeued job still starts, and nothing is lost.
"""

from __future__ import annotations

import os
from pathlib import Path

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import folders

RUN_FILES = ("metrics.jsonl", "samples.jsonl", "wandb_run_id", "tensorboard")
CHOICES = ("refuse", "move_aside")


def _has_rows(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except OSError:
        return False


def _checkpoint_items(root: Path) -> list[Path]:
    """Committed step folders, damaged folders moved aside earlier, and the `latest` pointer."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if (p.name.startswith("step_") and p.is_dir()) or p.name == folders.LATEST)


def _free_slot(run_dir: Path, root: Path) -> int:
    n = 1
    while (run_dir / f"previous-{n}").exists() or (root / f"previous-{n}").exists():
        n += 1
    return n


def move_aside(run_dir: Path, root: Path, log) -> tuple[Path, Path]:
    """Move the earlier launch's checkpoints and rows into previous-<n>/ beside them (renames only)."""
    n = _free_slot(run_dir, root)
    rows_to, checkpoints_to = run_dir / f"previous-{n}", root / f"previous-{n}"
    try:
        for item in _checkpoint_items(root):
            checkpoints_to.mkdir(parents=True, exist_ok=True)
            folders.forget(item)
            os.replace(item, checkpoints_to / item.name)
        for name in RUN_FILES:
            if (run_dir / name).exists():
                rows_to.mkdir(parents=True, exist_ok=True)
                os.replace(run_dir / name, rows_to / name)
    except OSError as e:
        raise JetMoEError(f"could not move the earlier run aside ({e.strerror or e}: {e.filename}); check that "
                          f"{run_dir} and {root} are writable") from None
    log(f"checkpoint: starting over; the earlier launch's checkpoints are in {checkpoints_to}, its rows in {rows_to}")
    return rows_to, checkpoints_to


def prepare(run_dir: str | Path, root: str | Path, resume: str, policy: str, log) -> None:
    """Called when nothing is resumed (resume: the checkpoint.resume value; policy: checkpoint.fresh_start)."""
    run_dir, root = Path(run_dir), Path(root)
    checkpoints = folders.list_checkpoints(root)
    rows = _has_rows(run_dir / "metrics.jsonl")
    if not checkpoints and not rows:
        return
    if not checkpoints and str(resume).lower() == "auto":
        move_aside(run_dir, root, log)  # nothing to continue: keep the earlier rows, beside the new ones
        return
    if policy != "move_aside":
        held = ", ".join(p.name for p in checkpoints[:3]) + (" ..." if len(checkpoints) > 3 else "")
        what = f"checkpoints {held}" if checkpoints else "metrics.jsonl rows"
        raise JetMoEError(f"checkpoint.resume={resume} would start over in {run_dir}, which holds a run ({what}); "
                          f"pick a new run directory (hydra.run.dir=...), continue it (checkpoint.resume=auto), or "
                          f"pass checkpoint.fresh_start=move_aside to move them into previous-<n>/ first")
    move_aside(run_dir, root, log)
