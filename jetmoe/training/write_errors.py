"""A full disk (or any write error) under the run directory stops the run with one line, after a checkpoint.

Rank 0's MetricsLogger keeps the first OSError its files raised (`write_error`) instead of letting it escape
mid-step as a traceback. At each step boundary `stop_if_unwritable` asks every rank (one tiny all-reduce) and,
when rank 0 failed, every rank saves the step (checkpoint.dir is often another filesystem with space left) and
raises the same JetMoEError, which names the problem, the checkpoint and the way forward.
"""

from __future__ import annotations

from jetmoe.errors import JetMoEError


def stop_if_unwritable(metrics, checkpoint, step: int, run_dir) -> None:
    """Collective. metrics: rank 0's MetricsLogger (inert elsewhere); checkpoint: the CheckpointManager."""
    comm = checkpoint.comm
    if comm.all_true(getattr(metrics, "write_error", None) is None):
        return
    problem = comm.broadcast(getattr(metrics, "write_error", None))
    try:
        folder = checkpoint.save(step) if checkpoint.last_saved != step else None
        checkpoint.commit_pending()
        saved = f"checkpoint of step {step} saved{f' in {folder}' if folder else ''}"
    except (OSError, JetMoEError) as e:
        saved = f"no checkpoint could be saved either ({e})"
    raise JetMoEError(f"cannot write the run's logs under {run_dir} after step {step}: {problem}; {saved}; "
                      "free space there and resume with the same command")
