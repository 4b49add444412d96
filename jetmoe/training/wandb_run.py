"""The wandb run of a run directory: one run per directory, continued by a resumed or requeued job.

The run id is written to `<run dir>/wandb_run_id` the first time and passed back to `wandb.init(id=...,
resume="allow")` on every later start: online, the job appends to the same run; offline, each start writes
its own `offline-run-*` folder with that id, and `wandb sync` uploads them all into the one run.
"""

from __future__ import annotations

import os
import secrets
import string
from pathlib import Path


ID_FILE = "wandb_run_id"


def run_id(run_dir: Path) -> str:
    """The run directory's wandb id, created on first use."""
    path = Path(run_dir) / ID_FILE
    if path.exists():
        stored = path.read_text().strip()
        if stored:
            return stored
    new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))  # wandb's id alphabet
    path.write_text(new + "\n")
    return new


def start_wandb(w, run_dir: Path, record: dict):
    """The wandb run for this run directory (None with `logging.wandb.mode=disabled`); `w` is the logging.wandb
    section, `record` the resolved config attached to the run; rows are keyed by the optimizer step."""
    if w.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    wandb_dir = Path(w.dir) if w.dir else Path(run_dir)
    wandb_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        mode=w.mode, project=w.project, entity=w.entity, name=w.name or Path(run_dir).name,
        tags=list(w.tags), dir=str(wandb_dir), id=run_id(run_dir), resume="allow",
        config=record, allow_val_change=True,
        settings=wandb.Settings(console="off", x_disable_stats=True) if _has_settings(wandb) else None,
    )
    run.define_metric("step")
    run.define_metric("*", step_metric="step")
    return run


def log_samples(run, records: list[dict]) -> None:
    """One wandb table of the samples taken at a step."""
    import wandb

    columns = ["step", "prompt", "kind", "text"]
    run.log({"samples": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in records]),
             "step": records[0]["step"]})


def alert(run, title: str, text: str) -> None:
    """A wandb alert (email/Slack when online); a failure to send it never stops training."""
    import wandb

    try:
        run.alert(title=title, text=text, level=wandb.AlertLevel.WARN, wait_duration=0)
    except Exception:  # no network, a wandb without alerts: the console line and metrics.jsonl still have it
        pass


def _has_settings(wandb) -> bool:
    try:
        wandb.Settings(console="off", x_disable_stats=True)
        return True
    except Exception:
        return False
