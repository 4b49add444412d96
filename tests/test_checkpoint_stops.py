"""Stops never cost the last good checkpoint (issue 21, items 4 and 16), through train/pretrain.py on CPU: a stop
on non-finite steps commits the save in flight, and saves taken inside a streak of skipped steps never prune the
newest checkpoint of a finite step; checkpoint settings that could only fail later are refused before step 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers.ckpt_run import FAST, ROOT, command, env
from jetmoe.training.checkpoint import list_checkpoints, verify
from jetmoe.training.checkpoint.folders import read_latest

pytestmark = pytest.mark.slow


def nan_run(run_dir, nan_from: int, *overrides, cache):
    script = [str(ROOT / "tests/helpers/nonfinite_pretrain.py"), f"hydra.run.dir={run_dir}", *FAST, *overrides]
    return subprocess.run([sys.executable, *script], env={**env(cache), "JETMOE_TEST_NAN_FROM": str(nan_from)},
                          capture_output=True, text=True, timeout=240, cwd=ROOT)


def error_line(out) -> str:
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    # one error line, last; before it only the warnings naming each non-finite step's source
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    assert all("was not finite" in line for line in lines[:-1]), out.stderr[-3000:]
    return errors[0]


def test_a_non_finite_stop_commits_the_save_in_flight(tmp_path):
    """Step 6's save is still writing in the background when step 7 (NaN) stops the run: it is committed."""
    run_dir = tmp_path / "run"
    line = error_line(nan_run(run_dir, 7, "train.max_steps=10", "checkpoint.every=2", "checkpoint.async=true",
                              "train.max_skipped_steps=1", cache=tmp_path))
    root = run_dir / "checkpoints"
    assert read_latest(root) == "step_00000006"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000006", "step_00000004"]
    assert all(verify(p) == [] for p in list_checkpoints(root))
    assert not list(root.glob("*.partial*")) and not [p for p in root.iterdir() if p.name.startswith(".")]
    assert "1 consecutive steps" in line and "step_00000006" in line, line


def test_saves_inside_a_non_finite_streak_never_prune_the_last_finite_checkpoint(tmp_path):
    """keep=1, a save every step, NaN from step 5, stop after 3 skipped steps: steps 5 and 6 are saved inside the
    streak; step 4, the last finite one, stays beside the newest."""
    run_dir = tmp_path / "run"
    line = error_line(nan_run(run_dir, 5, "train.max_steps=10", "checkpoint.every=1", "checkpoint.keep=1",
                              "checkpoint.async=false", "train.max_skipped_steps=3", cache=tmp_path))
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["step_00000006", "step_00000004"], names
    assert verify(run_dir / "checkpoints/step_00000004") == []
    assert "3 consecutive steps" in line and "step_00000004" in line, line


def _read_only(path):
    """A folder this process cannot write into, for root too (chmod alone does not stop root)."""
    path.mkdir()
    os.chmod(path, 0o555)
    try:
        (path / "probe").touch()
    except OSError:
        return path
    (path / "probe").unlink()
    blocker = path / "a-file"  # root: a folder under a file is unwritable for everyone
    blocker.write_text("")
    return blocker / "checkpoints"


@pytest.mark.parametrize("override,named", [
    ("checkpoint.data_changed=contineu", "checkpoint.data_changed"),
    ("checkpoint.keep=-1", "checkpoint.keep"),
    ("read-only", "is not writable"),
])
def test_checkpoint_settings_that_fail_later_are_refused_before_step_1(tmp_path, override, named):
    run_dir = tmp_path / "run"
    if override == "read-only":
        override = f"checkpoint.dir={_read_only(tmp_path / 'ro')}"
    line = error_line(subprocess.run(command(run_dir, "train.max_steps=2", "checkpoint.every=1", override),
                                     env=env(tmp_path), capture_output=True, text=True, timeout=240, cwd=ROOT))
    assert named in line, line
    assert not (run_dir / "metrics.jsonl").exists()
