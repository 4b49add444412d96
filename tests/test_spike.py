"""Loss spikes (issue 24 part 1): detection from the recent history, the skipped-data record, and end to end
through tests/helpers/spike_pretrain.py (train/pretrain.py with poisoned global batches) at pp=1 and pp=3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import ROOT, TINY_RUN, free_port, metrics
from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import list_checkpoints, verify
from jetmoe.training.skipped_data import RECORD, SkippedData, merge
from jetmoe.training.spike import SpikeDetector


# ------------------------------------------------------------------------------------------ detection
def test_a_jump_above_the_history_is_a_spike_and_stays_out_of_the_history():
    detector = SpikeDetector(window=4, loss_sigma=3, grad_norm_sigma=0, min_rise=0.1)
    for loss in (3.0, 3.1, 2.9, 3.0):
        assert detector.check(loss, 1.0) is None
        detector.record(loss, 1.0)
    spike = detector.check(9.0, 1.0)
    assert spike is not None and spike.signal == "lm_loss" and spike.value == 9.0
    before = detector.state_dict()
    assert detector.check(9.0, 1.0) is not None  # checking changes nothing: the next step is judged alike
    assert detector.state_dict() == before


def test_no_spike_before_the_window_is_full_nor_within_min_rise_of_a_flat_history():
    detector = SpikeDetector(window=3, loss_sigma=3, grad_norm_sigma=0, min_rise=0.1)
    detector.record(1.0, None)
    detector.record(1.0, None)
    assert detector.check(100.0, None) is None  # two of three steps of history
    detector.record(1.0, None)
    assert detector.check(1.05, None) is None  # a zero deviation, but under the 10% rise
    assert detector.check(1.2, None) is not None


def test_grad_norm_spike_and_history_round_trip():
    detector = SpikeDetector(window=2, loss_sigma=0, grad_norm_sigma=2, min_rise=0.0)
    for norm in (1.0, 1.2):
        detector.record(5.0, norm)
    assert detector.check(500.0, 1.1) is None  # loss_sigma=0: the loss is not judged
    assert detector.check(5.0, 10.0).signal == "grad_norm"
    copy = SpikeDetector(window=2, loss_sigma=0, grad_norm_sigma=2, min_rise=0.0)
    copy.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert copy.check(5.0, 10.0) == detector.check(5.0, 10.0)


# ------------------------------------------------------------------------------------------ skipped data
class _Loader:
    consumed_samples = 0


def test_skipped_ranges_are_passed_over_whole_batches_and_kept_for_the_next_launch(tmp_path):
    G = 4
    first = SkippedData(tmp_path, [[9, 10]], G, writer=True)
    loader = _Loader()
    positions = []
    for step in range(1, 5):
        first.advance(loader, step)
        positions.append(loader.consumed_samples)
        loader.consumed_samples += G
    assert positions == [0, 4, 12, 16]  # the batch [8, 12) overlaps [9, 10)
    first.add_rollback({"step": 4, "samples": first.batches_of(3, 4)})
    first.add_no_update({"step": 2, "samples": first.batches_of(2, 2)})

    again = SkippedData(tmp_path, [[9, 10]], G, writer=False)  # a resumed launch, from the record alone
    assert again.rollbacks == 1 and again.no_update(4) and not again.no_update(0)
    loader = _Loader()
    positions = []
    for step in range(1, 4):
        again.advance(loader, step)
        positions.append(loader.consumed_samples)
        loader.consumed_samples += G
    assert positions == [0, 4, 20]
    assert merge([[5, 8], [0, 2], [2, 3]]) == [[0, 3], [5, 8]]


def test_an_unreadable_record_is_a_one_line_error(tmp_path):
    (tmp_path / RECORD).write_text("{not json")
    with pytest.raises(JetMoEError, match=RECORD) as e:
        SkippedData(tmp_path, [], 4, writer=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, key", [("train.spike.policy=sometimes", "train.spike.policy"),
                                           ("train.spike.window=1", "train.spike.window"),
                                           ("train.spike.skip_samples=[[8,4]]", "train.spike.skip_samples")])
def test_bad_spike_settings_name_the_key(run_config, override, key):
    with pytest.raises(JetMoEError, match=key.replace(".", r"\.")) as e:
        run_config(override)
    assert "\n" not in str(e.value)


def test_rollback_needs_checkpoints(run_config):
    with pytest.raises(JetMoEError, match="checkpoint.every"):
        run_config("train.spike.policy=rollback", "checkpoint.every=0")
    assert run_config("train.spike.policy=rollback", "checkpoint.every=4").train.spike.policy == "rollback"


# ------------------------------------------------------------------------------------------ end to end
# G=6: step s trains samples [6(s-1), 6s) unless batches were skipped. Poisoned (loss x50): the batches at 12
# (step 3, before any checkpoint: the step is skipped), 30 (step 6: rolled back to step 4, steps 5-6's batches
# [24, 36) passed over) and 48 (step 7 after that rollback: over max_rollbacks=1, the run stops).
SPIKE = ["train.spike.window=2", "train.spike.loss_sigma=3", "train.spike.grad_norm_sigma=0",
         "train.spike.skip_window=1", "train.spike.max_rollbacks=1", "checkpoint.every=4", "checkpoint.async=false"]


def _start(run_dir: Path, pp: int, poison: str, *overrides: str) -> subprocess.Popen:
    script = [str(ROOT / "tests/helpers/spike_pretrain.py"), *TINY_RUN, "logging.wandb.mode=disabled",
              f"hydra.run.dir={run_dir}", *SPIKE, *overrides]
    if pp > 1:
        script = ["-m", "torch.distributed.run", "--nproc-per-node", str(pp), "--master-addr", "127.0.0.1",
                  "--master-port", str(free_port()), *script, f"parallel=pp{pp}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_TEST_POISON": poison, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _hashes(run_dir: Path, rank: int) -> dict[int, str]:
    """step -> the stage's parameter hash after that step, as first trained (before any rollback)."""
    out = {}
    for line in (run_dir / f"param_hashes_rank{rank}.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], row["sha256"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("pp", [1, 3])
def test_skip_keeps_the_weights_and_rollback_continues_as_a_run_told_to_skip_the_spike(tmp_path, pp):
    spiky = _start(tmp_path / "spiky", pp, "12,30,48", "train.spike.policy=rollback", "train.max_steps=8")
    told = _start(tmp_path / "told", pp, "12", "train.spike.policy=skip", "train.spike.skip_samples=[[24,36]]",
                  "train.max_steps=8")  # the same LR schedule
    out, err = spiky.communicate(timeout=600)
    told_out, told_err = told.communicate(timeout=600)
    assert told.returncode == 0, told_out[-3000:] + told_err[-3000:]

    # Over the rollback limit: one line naming the limit, no traceback of ours, the checkpoints intact.
    assert spiky.returncode != 0, out[-3000:] + err[-3000:]
    ours = [line for line in err.splitlines() if line.startswith("error")]
    assert len(ours) == 1 and "train.spike.max_rollbacks=1" in ours[0] and "step 7" in ours[0], err[-3000:]
    assert f'File "{ROOT / "jetmoe"}' not in err, err[-3000:]
    saved = list_checkpoints(tmp_path / "spiky/checkpoints")
    assert [f.name for f in saved] == ["step_00000004"] and all(verify(f) == [] for f in saved)

    for rank in range(pp):  # skip: step 3 (no checkpoint before it) left every stage's weights as they were
        hashes = _hashes(tmp_path / "spiky", rank)
        assert hashes[3] == hashes[2] and hashes[4] != hashes[3]

    rows, reference = metrics(tmp_path / "spiky"), metrics(tmp_path / "told")
    assert rows[3]["skipped"] and rows[3]["skip_reason"] == "spike" and rows[3]["alerts"]
    assert rows[5]["rollback"]["checkpoint_step"] == 4 and rows[5]["rollback"]["samples"] == [[24, 36]]
    assert reference[3]["skipped"]
    assert [rows[s]["lm_loss"] for s in range(1, 7)] == [reference[s]["lm_loss"] for s in range(1, 7)]

    record = json.loads((tmp_path / "spiky" / RECORD).read_text())
    assert record["ranges"] == [[24, 36]] and record["no_update"] == [[12, 18]] and record["rollbacks"] == 1
