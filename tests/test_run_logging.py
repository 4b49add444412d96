"""Watching a run: a resumed job continues the same wandb run (id kept in the run directory) with the
project, name, tags and resolved config it was given; TensorBoard gets the same scalars as wandb."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.trainer_small import SMALL
from helpers.trainer_wandb import history, run_info

REPO = Path(__file__).resolve().parents[1]


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(REPO / "train/pretrain.py"), *SMALL, "train.eval_every=0", "checkpoint.every=2",
         "logging.wandb.mode=offline", "logging.wandb.project=watch-test", "logging.wandb.name=my-run",
         "logging.wandb.tags=[tiny,cpu]", "logging.tensorboard=true", f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True, text=True, timeout=300, cwd=run_dir.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):  # one file per start of the job
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.mark.slow
def test_a_resumed_run_continues_its_wandb_run_and_tensorboard_has_the_wandb_scalars(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "train.max_steps=2")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    _train(run_dir, "train.max_steps=3")  # resumes from the step-2 checkpoint
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id

    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per start; `wandb sync` uploads both into the one run
    infos = [run_info(f) for f in files]
    for info in infos:
        assert (info["id"], info["project"], info["name"], info["tags"]) == (run_id, "watch-test", "my-run",
                                                                            ["tiny", "cpu"])
        assert info["config"]["logging"]["wandb"]["tags"] == ["tiny", "cpu"]
        assert info["config"]["checkpoint"]["every"] == 2
    assert [i["config"]["train"]["max_steps"] for i in infos] == [2, 3]  # each start's resolved config
    logged = [history(f) for f in files]
    assert [[h["step"] for h in rows] for rows in logged] == [[1, 2], [3]]

    # TensorBoard: every scalar wandb got, at the same steps with the same values (float32 there).
    metrics = {json.loads(line)["step"]: json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    wandb_scalars = {}
    for row in logged[0] + logged[1]:
        for key, value in row.items():
            if not key.startswith("_") and key != "step" and isinstance(value, (int, float)):
                wandb_scalars.setdefault(key, {})[row["step"]] = value
    tb = _tensorboard_scalars(run_dir / "tensorboard")
    assert set(tb) == set(wandb_scalars)
    for key, by_step in wandb_scalars.items():
        assert tb[key].keys() == by_step.keys(), key
        for step, value in by_step.items():
            assert tb[key][step] == pytest.approx(float(value), rel=1e-6, abs=1e-30), (key, step)
    assert tb["lm_loss"] == pytest.approx({s: r["lm_loss"] for s, r in metrics.items()}, rel=1e-6)
