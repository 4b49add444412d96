"""train/plan.py: the table, the JSON last line, warnings, suggestions and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import plan as plan_cli  # noqa: E402

from jetmoe.model import JetMoEConfig  # noqa: E402
from jetmoe.plan import count_params  # noqa: E402

KEYS = ("total_params", "active_params", "memory_per_gpu_gib", "bubble_fraction", "tokens_per_day")


def plan(capsys, *overrides: str) -> tuple[str, dict]:
    assert plan_cli.main(list(overrides)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return "\n".join(out[:-1]), json.loads(out[-1])


@pytest.mark.slow
def test_cli_prints_table_then_one_json_line():
    out = subprocess.run([sys.executable, "train/plan.py", "+experiment=jetmoe_8b_96xh100"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert all(k in summary for k in KEYS)
    assert any(line.startswith("peak memory") for line in lines[:-1])


def test_96xh100_experiment_is_the_papers_layout(capsys):
    table, s = plan(capsys, "+experiment=jetmoe_8b_96xh100")
    counts = count_params(JetMoEConfig.preset("jetmoe_8b"))
    assert (s["total_params"], s["active_params"]) == (counts.total, counts.active)
    assert (s["gpus"], s["pp"], s["dp"], s["ep"], s["gpu"]) == (96, 3, 32, 1, "h100")
    assert s["tokens_per_step"] == 1024 * 4096  # the 4M-token batch
    assert s["micro_batches"] == 32 and s["bubble_fraction"] == pytest.approx(2 / 34, abs=1e-4)
    assert s["fits"] and 0 < s["memory_per_gpu_gib"] < s["gpu_memory_gib"]
    assert s["tokens_per_day"] == pytest.approx(s["tokens_per_sec"] * 86400, rel=1e-6)
    assert sum(s["params_per_stage"]) == counts.total + counts.embedding  # the tied copy on the last stage
    assert s["warnings"] == []
    from jetmoe.training.metrics import flops_per_token  # the trainer's MFU uses the planner's count
    assert s["flops_per_token"] == flops_per_token(JetMoEConfig.preset("jetmoe_8b"), 4096)
    assert round(s["flops_per_token"] / 1e9, 2) == 16.40  # causal attention counted as half
    for word in ("stage 0", "FLOPs/token", "all-to-all", "bubble", "tokens/day"):
        assert word in table


def test_expert_parallel_preset_shrinks_each_rank(capsys):
    _, dense = plan(capsys, "+experiment=jetmoe_8b_96xh100")
    _, ep8 = plan(capsys, "+experiment=jetmoe_8b_96xh100", "parallel=jetmoe_8b_pp3_ep8")
    assert ep8["ep"] == 8 and ep8["total_params"] == dense["total_params"]
    assert all(a < b for a, b in zip(ep8["params_per_rank"], dense["params_per_rank"]))
    assert ep8["memory_per_gpu_gib"] < dense["memory_per_gpu_gib"]
    assert dense["all_to_all_bytes_per_rank_per_step"] == 0 < ep8["all_to_all_bytes_per_rank_per_step"]


def test_bubble_warning_and_micro_batch_suggestions(capsys):
    # 32 sequences, micro-batch 4, pp=3 on 3 GPUs: 8 micro-batches, bubble 2/10
    table, s = plan(capsys, "parallel=pp3", "cluster.gpus=3", "train.global_batch_size=32",
                    "train.micro_batch_size=4")
    assert s["bubble_fraction"] == pytest.approx(2 / 10, abs=1e-4)
    assert any("bubble 20.0% > 10%" in w for w in s["warnings"])
    # 18 micro-batches reach 10%: a bigger batch, or micro-batch 1 (32 micro-batches, 5.9%)
    assert "train.global_batch_size=72" in table
    assert "train.micro_batch_size=1 -> 32 micro-batches, bubble 5.9%" in table
    _, ok = plan(capsys, "parallel=pp3", "cluster.gpus=3", "train.global_batch_size=32", "train.micro_batch_size=1")
    assert not any("bubble" in w for w in ok["warnings"])  # (the tiny model's step is mostly send latency)


def test_memory_warning_when_a_layout_does_not_fit(capsys):
    table, s = plan(capsys, "+experiment=jetmoe_8b_96xh100", "cluster.gpus=3", "parallel.pp=3",
                    "train.global_batch_size=48", "train.micro_batch_size=16")
    assert not s["fits"] and s["memory_per_gpu_gib"] > s["gpu_memory_gib"]
    assert any("does not fit" in w for w in s["warnings"])
    assert "DOES NOT FIT" in table


@pytest.mark.parametrize("overrides,message", [
    (["cluster.gpus=10", "parallel.pp=3"], "not divisible by parallel.pp=3"),
    (["+experiment=jetmoe_8b_96xh100", "cluster.gpu=tpu"], "unknown cluster.gpu='tpu'"),
    (["cluster.gpus=4", "parallel.ep=3"], "parallel.ep=3 does not divide"),
    (["cluster.nope=1"], "bad override"),
])
def test_errors_are_one_line(capsys, overrides, message):
    assert plan_cli.main(overrides) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
