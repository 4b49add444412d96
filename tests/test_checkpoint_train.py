"""Checkpoints in real training runs (train/pretrain.py, torchrun on CPU): exact resume, pp=1 <-> pp=3 x ep=2,
a stop signal, kill -9 under `torchrun --max-restarts`, export of a pipeline checkpoint."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from jetmoe.training.checkpoint import list_checkpoints, read_latest, verify
from helpers.ckpt_run import FAST, ROOT, command, env, metrics, pretrain, workers
from helpers.launch_util import free_port

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    """An uninterrupted pp=1 run, checkpoints every 2 steps, all kept."""
    run_dir = tmp_path_factory.mktemp("reference")
    pretrain(run_dir, f"train.max_steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=0", cache_dir=cache)
    rows = metrics(run_dir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return run_dir, rows


def _ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def _assert_losses(rows, ref, steps, exact):
    for s in steps:
        for key in ("lm_loss", "loss"):
            if exact:
                assert rows[s][key] == ref[s][key], (s, key, rows[s][key], ref[s][key])
            else:
                assert math.isclose(rows[s][key], ref[s][key], rel_tol=2e-5), (s, key, rows[s][key], ref[s][key])


def test_resume_same_layout_is_exact_and_auto_skips_a_damaged_checkpoint(reference, tmp_path, cache):
    ref_dir, ref = reference
    for step in (4, 6):
        shutil.copytree(_ckpt(ref_dir, step), _ckpt(tmp_path, step))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000006\n")
    damaged = _ckpt(tmp_path, 6) / "model-pp00.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    run = pretrain(tmp_path, f"train.max_steps={STEPS}", cache_dir=cache)  # checkpoint.resume=auto by default
    assert "step_00000006 is damaged" in run.stdout and "model-pp00.safetensors" in run.stdout
    assert "falling back to step_00000004" in run.stdout
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(5, STEPS + 1))
    _assert_losses(rows, ref, range(5, STEPS + 1), exact=True)


def test_pp1_to_pp3_ep2_and_back(reference, tmp_path, cache):
    transformers = pytest.importorskip("transformers")
    ref_dir, ref = reference
    pp3 = tmp_path / "pp3"
    pretrain(pp3, f"train.max_steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=0", "parallel.pp=3",
             "parallel.ep=2", f"checkpoint.resume={_ckpt(ref_dir, 2)}", nproc=6, cache_dir=cache)
    rows3 = metrics(pp3)
    assert sorted(rows3) == list(range(3, STEPS + 1))
    _assert_losses(rows3, ref, range(3, STEPS + 1), exact=False)
    folder = _ckpt(pp3, 4)
    # every rank wrote its own part: weights spread over each stage's dp ranks, its own ZeRO-1 fragments
    assert sorted(p.name for p in folder.glob("model-*.safetensors")) == \
        [f"model-pp0{i}-dp0{d}.safetensors" for i in range(3) for d in range(2)]
    assert len(list(folder.glob("optimizer/exp_avg-pp0*-dp0*.safetensors"))) == 6
    assert json.loads((folder / "trainer_state.json").read_text())["layout"] == {"world": 6, "pp": 3, "dp": 2, "ep": 2}

    # same layout, asynchronous saves: each rank reads only its part (bounded bytes), the resume is exact
    again = tmp_path / "pp3-again"
    run = pretrain(again, "train.max_steps=6", "checkpoint.every=2", "parallel.pp=3", "parallel.ep=2",
                   "checkpoint.async=true", f"checkpoint.resume={folder}", nproc=6, cache_dir=cache)
    assert "writing in the background" in run.stdout and read_latest(again / "checkpoints") == "step_00000006"
    ratio = float(re.search(r"bytes read per rank: max \d+, share \d+ \(([\d.]+)x\)", run.stdout).group(1))
    assert ratio <= 1.5, run.stdout
    _assert_losses(metrics(again), rows3, range(5, 7), exact=True)
    # another ZeRO-1 partition of the same stages (experts no longer split over ep)
    ep1 = tmp_path / "pp3-ep1"
    pretrain(ep1, "train.max_steps=6", "parallel.pp=3", "parallel.ep=1", f"checkpoint.resume={folder}", nproc=6,
             cache_dir=cache)
    _assert_losses(metrics(ep1), ref, range(5, 7), exact=False)

    back = tmp_path / "pp1"
    pretrain(back, f"train.max_steps={STEPS}", f"checkpoint.resume={folder}", cache_dir=cache)
    rows1 = metrics(back)
    _assert_losses(rows1, ref, range(5, STEPS + 1), exact=False)

    # the pipeline checkpoint exports to a transformers directory with the training model's logits
    from jetmoe.model import JetMoEForCausalLM
    from jetmoe.training.checkpoint.export import export_hf

    out = export_hf(folder, tmp_path / "hf", dtype="fp32", log=lambda s: None)
    ours = JetMoEForCausalLM.from_pretrained(folder).eval()
    hf = transformers.JetMoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)


def _wait_for_step(run_dir, step, proc, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(metrics(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"run ended before step {step}: {out[-2000:]} {err[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout}s")


def test_sigusr1_on_one_rank_stops_all_saves_and_exits_0(reference, tmp_path, cache):
    _, ref = reference
    proc = subprocess.Popen(command(tmp_path, f"train.max_steps={STEPS}", "parallel.pp=2", nproc=2),
                            env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 1, proc)
    ranks = workers(proc.pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGUSR1)  # only the last stage is told; rank 0 must stop too
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:] + err[-2000:]
    stopped = max(metrics(tmp_path))
    assert stopped < STEPS and f"SIGUSR1 received; stopping after step {stopped}" in out
    assert read_latest(tmp_path / "checkpoints") == f"step_{stopped:08d}"
    assert verify(_ckpt(tmp_path, stopped)) == []

    pretrain(tmp_path, f"train.max_steps={STEPS}", cache_dir=cache)  # resumes (auto) on one process, pp=1
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, STEPS + 1))
    _assert_losses(rows, ref, range(1, STEPS + 1), exact=False)


def test_kill9_under_torchrun_restarts_and_resumes(reference, tmp_path, cache):
    _, ref = reference
    proc = subprocess.Popen(command(tmp_path, f"train.max_steps={STEPS}", "parallel.pp=2", "checkpoint.every=2",
                                    nproc=2, max_restarts=1),
                            env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 3, proc)
    victim = workers(proc.pid)[1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "checkpoint: resumed from" in out
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, STEPS + 1))
    _assert_losses(rows, ref, range(1, STEPS + 1), exact=False)
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [f"step_{STEPS:08d}", f"step_{STEPS - 2:08d}"]


def test_kill9_during_async_save_keeps_latest_and_resumes(reference, tmp_path, cache):
    _, ref = reference
    cmd = command(tmp_path, f"train.max_steps={STEPS}", "parallel.pp=2", "checkpoint.every=2", "checkpoint.async=true",
                  nproc=2, max_restarts=1)
    cmd[cmd.index(str(ROOT / "train/pretrain.py"))] = str(ROOT / "tests/helpers/slow_save_pretrain.py")
    slow = {"JETMOE_TEST_SLOW_RANK": "1", "JETMOE_TEST_SLOW_STEP": "4", "JETMOE_TEST_SLOW_S": "3"}
    proc = subprocess.Popen(cmd, env={**env(cache), **slow}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(tmp_path, 5, proc)  # the loop went on while step 4 was being written
    root = tmp_path / "checkpoints"
    assert len(list(root.glob(".step_00000004.*.partial"))) == 1 and read_latest(root) == "step_00000002"
    os.kill(workers(proc.pid)[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert f"resumed from {root / 'step_00000002'} at step 2" in out
    rows = metrics(tmp_path)
    assert sorted(rows) == list(range(1, STEPS + 1))
    _assert_losses(rows, ref, range(1, STEPS + 1), exact=False)
    assert read_latest(root) == f"step_{STEPS:08d}" and verify(_ckpt(tmp_path, STEPS)) == []


def test_init_from_transformers_directory(reference, tmp_path, cache):
    from safetensors.torch import load_file

    from jetmoe.training.checkpoint.export import export_hf

    ref_dir, ref = reference
    hf = export_hf(_ckpt(ref_dir, STEPS), tmp_path / "hf", dtype="fp32", log=lambda s: None)
    run = tmp_path / "run"
    # lr 0: the first step leaves the weights as loaded, so the step-1 checkpoint must equal the directory
    out = pretrain(run, "train.max_steps=1", "train.lr=0", "checkpoint.every=1", f"model.init_from={hf}",
                   cache_dir=cache)
    assert f"initialised weights from {hf}" in out.stdout
    loaded = load_file(_ckpt(run, 1) / "model-pp00.safetensors")
    source = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    assert metrics(run)[1]["lm_loss"] < ref[1]["lm_loss"]


def test_bf16_dp2_resume_is_exact(tmp_path, cache):
    """bf16 (BF16_Optimizer: fp32 masters and Adam moments partitioned over dp=2): resuming from step 2
    gives the uninterrupted run's losses exactly."""
    bf16 = ("train.precision=bf16", "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep=0")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    pretrain(whole, *bf16, cache_dir=cache, nproc=2)
    ref = metrics(whole)
    shutil.copytree(_ckpt(whole, 2), _ckpt(resumed, 2))
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    pretrain(resumed, *bf16, cache_dir=cache, nproc=2)
    rows = metrics(resumed)
    assert sorted(rows) == [3, 4]
    _assert_losses(rows, ref, [3, 4], exact=True)


def _probe(mode, run_dir, *overrides, cache, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(ROOT / "tests/helpers/ckpt_bf16.py"), mode, str(run_dir), *FAST,
           *overrides]
    run = subprocess.run(cmd, env=env(cache), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _whole_state(folder, key):
    """{name: whole tensor} of one optimizer/index.json key, assembled from every rank's fragments."""
    from jetmoe.training.checkpoint.parts import PartReader

    reader = PartReader(folder)
    index = reader.json("optimizer/index.json")[key]
    return {n: reader.flat(s["parts"], n, 0, math.prod(s["shape"])).reshape(s["shape"]) for n, s in index.items()}


@pytest.mark.parametrize("ep", [1, 2])
def test_bf16_async_save_blocks_without_collectives_and_masters_move_exactly(tmp_path, cache, ep):
    """bf16 at dp=2: the blocking part of an async save runs no collective (weights come from the bf16 working
    copy every rank holds whole, expert rows are gathered later in the writing thread; the fp32 masters are
    written by the rank that owns them, like Adam's state). The weight files are the bf16 working copy (a bf16
    transformers folder), equal to the masters rounded; resumed at dp=1 ep=1 and saved again, weights,
    masters and moments come back bit for bit."""
    from safetensors.torch import load_file

    bf16 = ("train.precision=bf16", "checkpoint.keep=0")
    run = _probe("save", tmp_path / "dp2", *bf16, f"parallel.ep={ep}", cache=cache, nproc=2)
    blocking = re.findall(r"rank (\d): collectives while blocking: (.*)", run.stdout)
    assert sorted(r for r, _ in blocking) == ["0", "1"] and all(seen == "[]" for _, seen in blocking), run.stdout
    folder = _ckpt(tmp_path / "dp2", 2)
    assert read_latest(tmp_path / "dp2" / "checkpoints") == folder.name and verify(folder) == []
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in (folder / "optimizer").glob("master-*")) == \
        ["master-pp00-dp00.safetensors", "master-pp00-dp01.safetensors"]
    weights = {k: v for f in folder.glob("model-*.safetensors") for k, v in load_file(f).items()}
    masters = _whole_state(folder, "master")
    assert weights.keys() == masters.keys() and all(w.dtype == torch.bfloat16 for w in weights.values())
    assert all(torch.equal(masters[n].to(torch.bfloat16), weights[n]) for n in weights)
    assert any(not torch.equal(masters[n], weights[n].float()) for n in weights)  # the masters hold more
    from jetmoe.plan.checkpoint import bytes_per_param  # the planner's size model, against the bytes on disk

    stored = sum(p.stat().st_size for p in [*folder.glob("model-*"), *folder.glob("optimizer/*.safetensors")])
    params = sum(w.numel() for w in weights.values())
    assert abs(stored / (bytes_per_param(2) * params) - 1) < 0.02, (stored, params)

    again = tmp_path / "dp1"
    _probe("resave", again, *bf16, f"checkpoint.resume={folder}", cache=cache, nproc=1)
    resaved = _ckpt(again, 2)
    for key in ("master", "exp_avg", "exp_avg_sq"):
        before, after = _whole_state(folder, key), _whole_state(resaved, key)
        assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before), key
    after = {k: v for f in resaved.glob("model-*.safetensors") for k, v in load_file(f).items()}
    assert all(torch.equal(after[n], weights[n]) for n in weights)
