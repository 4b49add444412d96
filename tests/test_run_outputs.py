"""The run directory's logs survive the worst moments (issue 21): a kill while a resumed run cuts metrics.jsonl
and samples.jsonl, and a full disk under the run directory."""

from __future__ import annotations

import builtins
import io
import json
import os
import random
import signal
from pathlib import Path

import pytest

from jetmoe.training import jsonl_cut
from jetmoe.training.jsonl_cut import cut_after_step

LOGS = ("metrics.jsonl", "samples.jsonl")


def _rows(*steps) -> str:
    return "".join(json.dumps({"step": s, "lm_loss": 1.0 / s}) + "\n" for s in steps)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install_kill(point: str) -> None:
    """In a child: SIGKILL this process at `point`, one of the moments a rewrite of a log could be cut short."""
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if point == "after a truncating open" and "w" in mode and Path(str(file)).name in LOGS:
            _die()  # the file is empty now and nothing is written yet: the old rewrite in place
        return f

    builtins.open = io.open = open_
    for name in ("truncate", "ftruncate"):
        real = getattr(os, name)

        def after(*args, _real=real, **kwargs):
            _real(*args, **kwargs)
            if point == "after a truncate":
                _die()

        setattr(os, name, after)
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def around(*args, _real=real, **kwargs):
            if point == "before a rename":
                _die()
            _real(*args, **kwargs)
            if point == "after a rename":
                _die()

        setattr(os, name, around)


def _set_start_killed_at(point: str, run_dir: Path, logging, step: int) -> bool:
    """MetricsLogger.set_start(step) in a forked child killed at `point` if it gets there; True if it was killed."""
    from jetmoe.training.metrics import MetricsLogger

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            logger = MetricsLogger(run_dir, logging, enabled=True, max_steps=100)
            _install_kill(point)
            logger.set_start(step)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_kill_while_a_resume_cuts_the_logs_never_empties_them(tmp_path, run_config):
    logging = run_config("logging=quiet").logging
    before = {"metrics.jsonl": _rows(*range(1, 41)) + '{"step": 4', "samples.jsonl": _rows(10, 20, 30, 40)}
    after = {"metrics.jsonl": _rows(*range(1, 31)), "samples.jsonl": _rows(10, 20, 30)}
    killed = []
    for point in ("after a truncating open", "after a truncate", "before a rename", "after a rename"):
        run_dir = tmp_path / point.replace(" ", "-")
        run_dir.mkdir()
        for name, text in before.items():
            (run_dir / name).write_text(text)
        killed.append(_set_start_killed_at(point, run_dir, logging, step=30))
        for name in LOGS:
            assert (run_dir / name).read_text() in (before[name], after[name]), f"{name}, killed {point}"
    assert any(killed), "no kill point was reached: the test proves nothing"


def test_the_cut_keeps_rows_up_to_the_step_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(jsonl_cut, "_BLOCK", 64)  # many blocks, rows straddling their edges
    rng = random.Random(0)
    rows = [json.dumps({"step": s, "text": "x" * rng.randrange(0, 150)}) + "\n" for s in range(1, 60)]
    path = tmp_path / "metrics.jsonl"
    for step in (0, 1, 17, 58, 59, 80):
        path.write_text("".join(rows) + '{"step": 60, "te')
        removed = cut_after_step(path, step)
        expected = "".join(rows[:step])
        assert path.read_text() == expected
        assert removed == len("".join(rows).encode()) + len('{"step": 60, "te') - len(expected.encode())


def test_a_last_row_without_its_newline_is_kept_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(1, 2) + json.dumps({"step": 3}))
    cut_after_step(path, 3)
    with open(path, "a") as f:
        f.write(_rows(4))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert cut_after_step(tmp_path / "absent.jsonl", 3) == 0


@pytest.mark.slow
def test_a_full_disk_under_the_run_directory_stops_with_one_line_after_a_checkpoint(tmp_path):
    """Item 13: ENOSPC from the metrics flush and close were two raw tracebacks, and no checkpoint was tried."""
    import subprocess
    import sys

    from helpers.ckpt_run import ROOT, command, env, metrics
    from jetmoe.training.checkpoint import list_checkpoints, verify

    run_dir = tmp_path / "run"
    argv = command(run_dir, "train.max_steps=5", "checkpoint.every=0")
    argv[1] = str(ROOT / "tests/helpers/full_disk_pretrain.py")
    out = subprocess.run(argv, env={**env(tmp_path / "cache"), "JETMOE_TEST_FULL_DISK_STEP": "3"},
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: cannot write the run's logs under {run_dir} after step 3: metrics.jsonl: "
                               f"{os.strerror(28)}; checkpoint of step 3 saved"), lines[0]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000003"]
    assert verify(run_dir / "checkpoints" / "step_00000003") == []
    assert sorted(metrics(run_dir)) == [1, 2] and not (run_dir / "run.lock").exists()
