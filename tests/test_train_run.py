"""The entry point end to end: a short run writes every metrics key, config.yaml and an offline wandb run."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import free_port  # noqa: E402
from helpers.trainer_small import SMALL  # noqa: E402
from helpers.trainer_wandb import history  # noqa: E402

from jetmoe.training.metrics import REQUIRED_KEYS  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts processes

REPO = Path(__file__).resolve().parents[1]


def test_short_default_run_writes_every_metric_and_an_offline_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train/pretrain.py"), *SMALL, "logging=default", "logging.wandb.mode=offline",
         "logging.progress_bar=false", "logging.router_every=2", "train.eval_every=3", "train.eval_batches=1",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in REQUIRED_KEYS if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in REQUIRED_KEYS)
        assert r["skipped"] is False
    assert rows[-1]["tokens"] == 3 * 8 * 32
    assert "eval_loss" in rows[2] and math.isfinite(rows[2]["eval_loss"])
    router = rows[1]["router"]  # router_every=2
    assert len(router["balance_moe"]) == 4 and len(router["share_moa"][0]) == 4
    # per-layer balance losses add up to the logged total
    total = sum(router["balance_moa"]) + sum(router["balance_moe"])
    assert abs(total - rows[1]["balance_loss"]) < 1e-4 * total
    assert (run_dir / "config.yaml").exists()
    # a readable per-step console line
    assert "step      3 | lm " in proc.stdout + proc.stderr
    runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = history(runs[0])
    assert [h["lm_loss"] for h in logged] == [r["lm_loss"] for r in rows]
    assert [h["aux_loss"] for h in logged] == [r["aux_loss"] for r in rows]


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(tmp_path):
    run_dir = tmp_path / "run"
    # Weights of 1e30 overflow the gradients from the first step on.
    proc = subprocess.run(
        [sys.executable, str(REPO / "train/pretrain.py"), *SMALL, "train.max_steps=6", "model.initializer_range=1e30",
         "train.max_skipped_steps=2", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 consecutive steps" in errors[0] and "Traceback" not in proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["skipped"], r["skipped_total"]) for r in rows] == [(1, True, 1), (2, True, 2)]
    assert rows[0]["lm_loss"] == rows[1]["lm_loss"]  # the skipped update left the weights alone


def test_the_logged_objective_is_the_one_backpropagated(tmp_path):
    """The trainer's row (loss, lm, aux, balance, z) equals the plain model's on the same batch and weights,
    and the router gradients of its step equal the gradients of the plain model's objective."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/helpers/trainer_objective_check.py"), str(tmp_path / "run"), *SMALL,
         "model.aux_loss_coef=0.05", "model.z_loss_coef=0.01"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in got["plain"].items():
        assert math.isclose(got["logged"][key], value, rel_tol=1e-6), key
    assert got["router_params"] == 2 * 4  # the MoA and MoE router of each of the 4 blocks
    assert got["router_grad_rel_diff"] < 1e-5
    assert got["router_grad_rel_diff_lm_only"] > 1e-2  # the aux-loss gradient matters, so the check can fail


def _grad_accumulation_error(run_dir, *extra):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/helpers/trainer_grad_accum_check.py"), str(run_dir), *SMALL,
         "train.global_batch_size=16", "train.micro_batch_size=1", "train.precision=bf16", "optim.grad_clip=0", *extra],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_sums_the_micro_batch_gradients_in_fp32(tmp_path):
    """16 micro-batches in bf16: the gradient the optimizer steps with is the exact (fp64) sum of the
    micro-batches' bf16 gradients to fp32 precision (of the expert weights, whose backward adds into the fp32 sum
    directly: the exact sum of their products); DeepSpeed's default (bf16 sums) is far off."""
    fp32_sum = _grad_accumulation_error(tmp_path / "fp32_sum")
    assert fp32_sum["optimizer"] == "BF16_Optimizer" and fp32_sum["micro_batches"] == 16
    assert fp32_sum["expert_weights_fused"] == fp32_sum["expert_weights"] == 16  # 4 blocks x MoA, MoE x in, out
    assert fp32_sum["rel_error"] < 1e-6
    override = tmp_path / "bf16_sum.json"
    override.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"}))
    bf16_sum = _grad_accumulation_error(tmp_path / "bf16_sum", f"train.deepspeed_config={override}")
    assert bf16_sum["rel_error"] > 1e-3 > 1e3 * fp32_sum["rel_error"]  # the check can fail


def _gradient_bookkeeping(run_dir, *extra):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/helpers/grad_bookkeeping_bytes.py"), str(run_dir), *SMALL,
         "train.global_batch_size=8", "train.micro_batch_size=1", "train.precision=bf16", *extra],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bf16_expert_gradients_sum_exactly_through_the_pipeline(tmp_path):
    """pp=2 (1F1B: several micro-batches' forwards in flight while earlier backwards add into the same fp32 sums):
    on each stage, the summed gradient is exact to fp32 precision and every expert weight took the fused path."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", str(REPO / "tests/helpers/trainer_grad_accum_check.py"),
         str(tmp_path / "run"), *SMALL, "train.global_batch_size=16", "train.micro_batch_size=1",
         "train.precision=bf16", "optim.grad_clip=0", "parallel.pp=2", "model.tie_word_embeddings=false"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = [json.loads(m) for m in re.findall(r'\{"optimizer".*?\}', proc.stdout)]
    assert len(stages) == 2, proc.stdout[-2000:]
    for got in stages:
        assert got["expert_weights_fused"] == got["expert_weights"] == 8  # 2 blocks x MoA, MoE x in, out
        assert got["rel_error"] < 1e-6


def test_bf16_gradients_are_summed_in_one_pass_per_micro_batch(tmp_path):
    """Bytes moved per micro-batch and parameter to keep the fp32 gradient sum, outside the model's own backward.
    Expert weights: their backward matmul adds into the fp32 sum (C read and written: 8 B; no bf16 gradient is
    written). Other weights: one mixed-dtype add per gradient (read bf16 + fp32, write fp32: 10 B). Plus the step's
    dp flatten and zeroing spread over 8 micro-batches (3 B). DeepSpeed's default path (zero every bf16 gradient,
    autograd adds into it, a cast to an fp32 copy, then the add) moves 28 B."""
    now = _gradient_bookkeeping(tmp_path / "fused")
    assert now["immediate_grad_update"] and now["micro_batches"] == 8
    n, experts = now["params"], now["expert_params"]
    assert 0 < experts < n
    assert now["by_op"]["jetmoe.grouped_mm_backward_into_main_grad.default"] * n / experts == pytest.approx(8.0)
    assert now["by_op"]["aten.add_.Tensor"] * n / (n - experts) == pytest.approx(10.0, rel=0.02)
    assert now["bytes_per_param_per_micro_batch"] <= 13.5, now
    assert "aten._to_copy.default" not in now["by_op"] and "aten._foreach_zero_.default" not in now["by_op"]
    override = tmp_path / "deepspeed_default.json"
    override.write_text(json.dumps({"bf16": {"immediate_grad_update": False}}))
    default = _gradient_bookkeeping(tmp_path / "default", f"train.deepspeed_config={override}")
    assert default["bytes_per_param_per_micro_batch"] >= 25, default  # the counter sees the sweeps it cuts
