"""The resume rules end to end (issue 21, items 1, 5, 6, 12), through train/pretrain.py on a two-phase mixture:
a config that a checkpoint cannot continue is a config error that touches nothing (never damage, never a
fallback that overwrites the intact newest checkpoint); a fresh start never lands on an earlier launch's
checkpoints or metrics; a new lr is applied, not ignored; data_changed=continue keeps the phase of the step; a
damaged trainer_state.json is damage like any other file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from helpers.ckpt_run import ROOT, command, env, metrics
from helpers.data_corpus import tokenizer_file, write_jsonl, synthetic_docs
from helpers.data_mixture import mixture_overrides

pytestmark = pytest.mark.slow

PHASES = "data.phases=[{start_step:0,weights:{web:3,code:1}},{start_step:4,weights:{web:1,code:1}}]"
EDITED_NOW = "data.phases=[{start_step:0,weights:{web:3,code:1}},{start_step:4,weights:{web:1,code:3}}]"
EDITED_PAST = "data.phases=[{start_step:0,weights:{web:1,code:1}},{start_step:4,weights:{web:1,code:1}}]"


def _mixture(root, tokenizer) -> list[str]:
    overrides = [o for o in mixture_overrides(root, tokenizer) if not o.startswith("data.phases=")]
    return overrides + [PHASES]


def run(run_dir, *overrides, cache, timeout=300):
    return subprocess.run(command(run_dir, *overrides), env=env(cache), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def ok(out):
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def user_error(out) -> str:
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error"), out.stderr[-3000:]
    return lines[0]


def outputs(run_dir) -> dict:
    """Every byte a run keeps (checkpoints, rows, config records); Hydra's own .hydra/ and log aside."""
    keep = ("checkpoints", "metrics.jsonl", "samples.jsonl", "config.yaml", "configs", "wandb_run_id", "previous-1")
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] in keep}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A two-phase mixture (phase 2 from step 4) trained to step 6, a checkpoint every 2 steps (4 and 6 kept)."""
    root = tmp_path_factory.mktemp("mixture")
    overrides = _mixture(root, tokenizer_file(tmp_path_factory))
    proc = subprocess.run([sys.executable, "train/pretokenize.py", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "run"
    ok(run(run_dir, *overrides, "train.max_steps=6", "checkpoint.every=2", cache=root))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    return root, overrides, run_dir


def _copy(base, tmp_path):
    root, overrides, run_dir = base
    shutil.copytree(run_dir, tmp_path / "run")
    return root, overrides, tmp_path / "run"


@pytest.mark.parametrize("change,key,was,now", [
    (EDITED_NOW, "data.phases", "'code': 1.0", "'code': 3.0"),  # the current phase, begun at step 4
    (EDITED_PAST, "data.phases", "'web': 3.0", "'web': 1.0"),
    ("train.seed=7", "train.seed", "1234", "7"),
    ("train.global_batch_size=8", "train.global_batch_size", "4", "8"),
    ("model.hidden_size=64", "model.hidden_size", "128", "64"),
])
def test_a_config_the_checkpoint_cannot_continue_is_refused_and_touches_nothing(base, tmp_path, change, key, was, now):
    root, overrides, run_dir = _copy(base, tmp_path)
    before = outputs(run_dir)
    line = user_error(run(run_dir, *overrides, "train.max_steps=8", "checkpoint.every=2", change, cache=root))
    assert line.startswith(f"error: {key}") or f" {key}" in line, line
    assert was in line and now in line, line
    assert "damaged" not in line and "falling back" not in line
    assert ("checkpoint.data_changed=continue" in line) == key.startswith(("data", "train")), line
    assert "model.init_from=" in line or not key.startswith("model")
    assert outputs(run_dir) == before  # nothing written, pruned or overwritten


def test_a_fresh_start_is_refused_where_a_run_is_and_move_aside_keeps_it(base, tmp_path):
    root, overrides, run_dir = _copy(base, tmp_path)
    before = outputs(run_dir)
    line = user_error(run(run_dir, *overrides, "train.max_steps=2", "checkpoint.every=2", "checkpoint.resume=none",
                          cache=root))
    assert f"would start over in {run_dir}" in line and "step_00000006" in line
    assert "hydra.run.dir=" in line and "checkpoint.fresh_start=move_aside" in line
    assert outputs(run_dir) == before

    out = ok(run(run_dir, *overrides, "train.max_steps=2", "checkpoint.every=2", "checkpoint.resume=none",
                 "checkpoint.fresh_start=move_aside", cache=root)).stdout
    assert "starting over" in out
    kept = run_dir / "checkpoints" / "previous-1"
    for step in (4, 6):  # the earlier launch's checkpoints, byte for byte, beside the new run's
        folder = f"checkpoints/step_{step:08d}"
        assert {k.replace("checkpoints/previous-1/", "checkpoints/"): v for k, v in outputs(run_dir).items()
                if k.startswith(f"checkpoints/previous-1/step_{step:08d}/")} == \
            {k: v for k, v in before.items() if k.startswith(folder + "/")}
    assert (kept / "latest").read_text().strip() == "step_00000006"
    assert (run_dir / "previous-1" / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    assert sorted(metrics(run_dir)) == [1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000002"]


def test_a_new_lr_is_applied_on_resume_and_said(base, tmp_path):
    root, overrides, run_dir = base
    reference = metrics(run_dir)
    config = json.loads((run_dir / "checkpoints/step_00000004/trainer_state.json").read_text())["config"]
    lr = config["train"]["lr"]
    out = ok(run(tmp_path / "run", *overrides, "train.max_steps=6", f"train.lr={2 * lr}",
                 f"checkpoint.resume={run_dir / 'checkpoints/step_00000004'}", cache=root)).stdout
    assert f"train.lr {lr} -> {2 * lr}" in out
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [5, 6]
    for step in (5, 6):  # the same schedule at twice the peak: what config.yaml says ran, ran
        assert rows[step]["lr"] == 2 * reference[step]["lr"], (step, rows[step]["lr"], reference[step]["lr"])


def test_data_changed_continue_keeps_the_phase_of_the_step(base, tmp_path):
    """One document appended to a web file (new data), resumed at step 6 with continue: steps 7-8 draw the
    phase of steps 5-6 (begun at step 4), and tokens_by_source goes on from step 6's counts."""
    root, overrides, run_dir = _copy(base, tmp_path)
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    grown = corpus / "web" / "part0.jsonl"
    write_jsonl(grown, [json.loads(line)["text"] for line in grown.read_text().splitlines()] + synthetic_docs(40, 5))
    moved = [o.replace(str(root / "corpus"), str(corpus)) for o in overrides]
    proc = subprocess.run([sys.executable, "train/pretokenize.py", *moved], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = user_error(run(run_dir, *moved, "train.max_steps=8", cache=root))
    assert "was trained on other data" in line and "checkpoint.data_changed=continue" in line

    out = ok(run(run_dir, *moved, "train.max_steps=8", "checkpoint.data_changed=continue", cache=root)).stdout
    assert "continuing on this data from step 6" in out
    rows = metrics(run_dir)

    def drawn(step):
        return {k: rows[step]["tokens_by_source"][k] - rows[step - 1]["tokens_by_source"][k] for k in ("web", "code")}

    assert drawn(7) == drawn(8) == drawn(5) == drawn(6)  # phase 2's mixture, as before the resume
    assert drawn(3) != drawn(5)  # the phases differ, so the check can fail
    assert rows[7]["tokens_by_source"]["web"] > rows[6]["tokens_by_source"]["web"]


@pytest.mark.parametrize("verify", ["full", "size"])
def test_a_damaged_trainer_state_falls_back_like_any_damaged_file(base, tmp_path, verify):
    root, overrides, run_dir = _copy(base, tmp_path)
    state = run_dir / "checkpoints/step_00000006/trainer_state.json"
    data = bytearray(state.read_bytes())
    data[0] ^= 1  # '{' -> 'z': not JSON any more, same size
    state.write_bytes(bytes(data))
    damaged = state.read_bytes()
    out = ok(run(run_dir, *overrides, "train.max_steps=7", "checkpoint.every=0", f"checkpoint.verify={verify}",
                 cache=root))
    assert "step_00000006 is damaged" in out.stdout and "trainer_state.json" in out.stdout
    assert "falling back to step_00000004" in out.stdout and "Traceback" not in out.stderr
    assert sorted(metrics(run_dir)) == list(range(1, 8))
    assert state.read_bytes() == damaged  # kept as it is, for whoever looks
