"""The planner's step, cost by cost: checked end to end against a recipe stage trained on an H200 (bench/gpu.py's
JSON in tests/data), and each engine behaviour (plan/engine_model.py) shown to move its own line."""

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import plan as plan_cli  # noqa: E402
from helpers.plan_config import compose_config  # noqa: E402

from jetmoe.plan import inputs_from_config, make_plan  # noqa: E402
from jetmoe.plan.engine_model import BEFORE_ISSUE_22, DURING_LAST_BACKWARD, REDUCE_SCATTER, TODAY  # noqa: E402
from jetmoe.plan.hardware import DEFAULT_EFFICIENCIES  # noqa: E402
from jetmoe.plan.step import KEYS  # noqa: E402

H200_CHECK = ROOT / "tests/data/gpu_check_h200.json"  # bench/gpu.py on one H200, torch 2.11, 2026-12-04
# The same stage trained again after issue 22's first cut (one-pass bf16 gradient sums): its train section only.
H200_CUT1 = ROOT / "tests/data/gpu_check_h200_cut1.json"
RECIPE = ["+experiment=jetmoe_8b_96xh100"]
# Autograd's own add of each micro-batch's weight gradient into the zeroed bf16 .grad (read 2 + 2, write 2): part
# of the engine's accumulation bytes, but inside the backward that bench/gpu.py's split counts as compute.
AUTOGRAD_ADD_BYTES_PER_PARAM = 6


def run(capsys, *overrides: str) -> tuple[str, dict]:
    assert plan_cli.main(list(overrides)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return "\n".join(out[:-1]), json.loads(out[-1])


def stage_run_overrides(check: dict) -> list[str]:
    """The config of the check's recipe-stage run, read from the command it launched."""
    keys = ("model", "model.num_hidden_layers", "data.seq_len", "train.global_batch_size", "train.micro_batch_size",
            "train.precision", "train.compile")
    command = dict(a.split("=", 1) for a in shlex.split(check["train"]["launch"]["command"]) if "=" in a)
    return [f"{k}={command[k]}" for k in keys] + ["cluster.gpus=1", "cluster.gpu=h200",
                                                  f"cluster.calibration={H200_CHECK}"]


def _stage_plan(check: dict, engine):
    inp = inputs_from_config(compose_config(stage_run_overrides(check)))
    return make_plan(dataclasses.replace(inp, engine=engine))


def test_a_recipe_stage_on_an_h200_is_predicted_within_15_percent():
    """8 JetMoE-8B blocks + embedding + head, 8 micro-batches of 4096 tokens, compiled, one H200, DeepSpeed's
    accumulation as it was then: the planner fed only the check's micro-benchmarks predicts the step its training
    section measured."""
    check = json.loads(H200_CHECK.read_text())
    cal = check["calibration"]
    measured = cal["train_step_breakdown_s"]  # compute, grad_accumulation, optimizer
    s = _stage_plan(check, BEFORE_ISSUE_22).summary()
    part = s["step_breakdown_s"]
    assert s["micro_batches"] == cal["train_micro_batches"] and s["warnings"] == []
    assert s["step_seconds"] == pytest.approx(sum(measured.values()), rel=0.15)
    assert s["predicted_mfu"] == pytest.approx(cal["train_mfu"], rel=0.15)
    assert part["optimizer"] == pytest.approx(measured["optimizer"], rel=0.15)
    autograd = part["grad_accumulation"] * AUTOGRAD_ADD_BYTES_PER_PARAM / BEFORE_ISSUE_22.grad_accumulation_bytes_per_param
    assert part["grad_accumulation"] - autograd == pytest.approx(measured["grad_accumulation"], rel=0.15)
    assert part["compute"] + autograd == pytest.approx(measured["compute"], rel=0.15)


def test_the_same_stage_after_the_one_pass_accumulation_is_predicted_too():
    """The stage again with the one-pass accumulation (each gradient added into the fp32 sum in its hook): the step within
    15%; the accumulation within 30% (737 small adds per step, whose launches the byte count leaves out)."""
    check, after = json.loads(H200_CHECK.read_text()), json.loads(H200_CUT1.read_text())
    measured = after["train"]["launch"]["step_breakdown_s"]
    # that run's head still recomputed its logits, and its expert gradients went through the hooks like the rest
    ran = dataclasses.replace(TODAY, head_recomputes_logits=True, expert_grad_accumulation_bytes_per_param=None)
    part = _stage_plan(check, ran).summary()["step_breakdown_s"]
    assert sum(part.values()) == pytest.approx(after["train"]["launch"]["step_s_device"], rel=0.15)
    assert part["grad_accumulation"] == pytest.approx(measured["grad_accumulation"], rel=0.30)
    assert part["optimizer"] == pytest.approx(measured["optimizer"], rel=0.15)


def test_the_planner_before_issue_22_misses_that_stage_by_more():
    """Compute at an assumed 35% MFU and nothing else (no accumulation sweeps, no optimizer): the check fails."""
    check = json.loads(H200_CHECK.read_text())
    inp = inputs_from_config(compose_config(stage_run_overrides(check)))
    old = dataclasses.replace(inp, mfu=0.35, efficiencies=dataclasses.replace(inp.efficiencies, optimizer_ns_per_param=0),
                              engine=dataclasses.replace(TODAY, grad_accumulation_bytes_per_param=0,
                                                         optimizer_full_sweep_bytes_per_param=0))
    measured = sum(check["calibration"]["train_step_breakdown_s"].values())
    assert make_plan(old).step_seconds < 0.85 * measured


def test_h200_defaults_are_the_measured_numbers_and_others_say_they_are_derived():
    cal = json.loads(H200_CHECK.read_text())["calibration"]
    h200 = DEFAULT_EFFICIENCIES["h200"]
    for key in ("dense_gemm_tflops", "grouped_gemm_tflops", "attention_tflops", "hbm_gbps",
                "grad_accumulation_ns_per_param", "optimizer_ns_per_param"):
        assert getattr(h200, key) == pytest.approx(cal[key], rel=1e-3), key
    assert "measured by bench/gpu.py on an H200" in h200.source
    assert all("derived from the H200" in DEFAULT_EFFICIENCIES[g].source for g in ("h100", "a100"))


def test_the_breakdown_adds_up_and_the_table_shows_it(capsys):
    table, s = run(capsys, *RECIPE)
    part = s["step_breakdown_s"]
    assert set(KEYS) <= set(part) and all(v >= 0 for v in part.values())
    assert sum(part.values()) == pytest.approx(s["step_seconds"], abs=1e-3)
    assert s["tokens_per_sec"] == pytest.approx(s["tokens_per_step"] / s["step_seconds"], rel=1e-3)
    assert s["predicted_mfu"] == pytest.approx(
        s["tokens_per_step"] * s["flops_per_token"] / (s["gpus"] * 989e12 * s["step_seconds"]), rel=1e-3)
    for key in KEYS:
        assert f"  {key} " in table
    assert "predicted MFU" in table and "engine " in table and "efficiencies " in table
    for key in ("total_params", "active_params", "memory_per_gpu_gib", "bubble_fraction", "tokens_per_day",
                "flops_per_token", "mfu_assumed", "all_to_all_bytes_per_rank_per_step",
                "pipeline_bytes_per_boundary_per_step", "checkpoint_bytes"):
        assert key in s


def _recipe(**engine):
    inp = inputs_from_config(compose_config(RECIPE))
    return make_plan(dataclasses.replace(inp, engine=dataclasses.replace(TODAY, **engine)))


SLOT = {"bubble", "imbalance"}  # follow any per-micro-batch cost: the slot sets the fill, drain and the slowest stage


@pytest.mark.parametrize("switch,moved,also", [
    ({"grad_accumulation_bytes_per_param": 6.0}, "grad_accumulation", SLOT),  # fp32 main_grad fused into the GEMM
    ({"dp_reduce_op": REDUCE_SCATTER}, "dp_reduce", {"optimizer"}),
    ({"dp_reduce_starts": DURING_LAST_BACKWARD}, "dp_reduce", {"optimizer"}),
    ({"optimizer_full_sweep_bytes_per_param": 0.0}, "optimizer", {"dp_reduce"}),
    ({"engine_overhead_s_per_micro_batch": 0.002}, "engine_overhead", SLOT),
])
def test_each_engine_behaviour_moves_its_own_line(switch, moved, also):
    """The tail's two lines are the stage that ends last's; a switch may change which stage that is."""
    before, after = _recipe().step.parts, _recipe(**switch).step.parts
    assert after[moved] < before[moved] or (moved == "engine_overhead" and after[moved] > before[moved])
    for key in set(KEYS) - {moved} - also:
        assert after[key] == pytest.approx(before[key], rel=1e-9), (moved, key)
    if "optimizer" in also or "dp_reduce" in also:
        assert after["optimizer"] + after["dp_reduce"] < before["optimizer"] + before["dp_reduce"]


def test_accumulation_scales_with_its_bytes_and_reduce_scatter_halves_the_reduction():
    hooks = _recipe(expert_grad_accumulation_bytes_per_param=None)  # every gradient through the hook's add
    fused = _recipe(grad_accumulation_bytes_per_param=6.0, expert_grad_accumulation_bytes_per_param=None)
    assert fused.step.parts["grad_accumulation"] == pytest.approx(
        hooks.step.parts["grad_accumulation"] * 6 / TODAY.grad_accumulation_bytes_per_param)
    today = _recipe()  # the expert weights at 6 B, the rest at 10 B
    stages = today.stages
    expert = sum(s.expert_per_rank for s in stages) / sum(s.per_rank for s in stages)
    assert 0.9 < expert < 1
    assert today.step.parts["grad_accumulation"] == pytest.approx(
        hooks.step.parts["grad_accumulation"] * (expert * 6 + (1 - expert) * 10) / 10, rel=0.01)
    scatter = _recipe(dp_reduce_op=REDUCE_SCATTER)
    reduce = [t for t in today.traffic[0].transfers if t.op == "all_reduce" and t.category == "dp"][0]
    scattered = [t for t in scatter.traffic[0].transfers if t.op == REDUCE_SCATTER][0]
    assert scattered.payload_bytes == reduce.payload_bytes and scattered.wire_bytes * 2 == reduce.wire_bytes


def test_cluster_mfu_sets_only_the_compute(capsys):
    _, base = run(capsys, *RECIPE)
    _, fixed = run(capsys, *RECIPE, "cluster.mfu=0.5")
    assert fixed["mfu_assumed"] == 0.5 and base["mfu_assumed"] is None
    part, ref = fixed["step_breakdown_s"], base["step_breakdown_s"]
    # mean stage compute = all stages' MFU-convention FLOPs / (pp x 0.5 x peak), over the micro-batches of a step
    flops = fixed["flops_per_token"] * fixed["tokens_per_step"] / fixed["dp"]
    assert part["compute"] == pytest.approx(flops / fixed["pp"] / (0.5 * 989e12), rel=1e-3)
    for key in ("grad_accumulation", "dp_reduce", "pipeline_p2p", "optimizer"):
        assert part[key] == pytest.approx(ref[key], rel=1e-3), key
    assert fixed["predicted_mfu"] < 0.5


def test_the_head_chunk_is_the_models():
    from jetmoe.model.loss import HEAD_CHUNK_TOKENS

    assert TODAY.head_chunk_tokens == HEAD_CHUNK_TOKENS


def test_the_recipe_step_shrinks_by_a_quarter_and_its_comment_quotes_the_planner():
    inp = inputs_from_config(compose_config(RECIPE))
    before = make_plan(dataclasses.replace(inp, engine=BEFORE_ISSUE_22)).summary()
    today = make_plan(inp).summary()
    assert today["step_seconds"] <= 0.75 * before["step_seconds"]
    recipe = (ROOT / "configs/experiment/jetmoe_8b_96xh100.yaml").read_text()
    for plan in (before, today):
        assert f"= {plan['step_seconds']:.3f} s, predicted MFU {plan['predicted_mfu']:.1%}" in recipe
