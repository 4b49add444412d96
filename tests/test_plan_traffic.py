"""The planner's bytes per rank per step (jetmoe.plan.traffic.step_traffic) against the bytes a spy on
torch.distributed counts in real training steps (tests/helpers/traffic_spy.py): bf16 on four CPU processes
(gloo), for every category (dp, pp, ep) and every operation in it, per stage. pp=2 x dp=2 x ep=2 has every
kind of traffic; pp=1 x dp=4 x ep=2 adds expert gradients reduced over their expert-data group of two."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.launch_util import free_port

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

from helpers.plan_config import compose_config  # noqa: E402

from jetmoe.plan import inputs_from_config  # noqa: E402
from jetmoe.plan.engine_model import TODAY  # noqa: E402
from jetmoe.plan.layout import stage_params  # noqa: E402
from jetmoe.plan.params import count_params  # noqa: E402
from jetmoe.plan.traffic import CATEGORIES, step_traffic  # noqa: E402

pytestmark = pytest.mark.slow
TOLERANCE = 0.05
STEPS = 2
RUN = ["train.precision=bf16", "train.global_batch_size=8",
       "train.micro_batch_size=2", "data.seq_len=64", "model.hidden_size=64", "model.num_hidden_layers=4",
       "model.num_key_value_heads=2", "model.kv_channels=16", "model.intermediate_size=64", "model.vocab_size=512",
       "train.eval_every=0", "logging=quiet", "logging.wandb.mode=disabled", "logging.router_every=0",
       "checkpoint.every=0", "parallel.timeout_s=300"]
WORLD = 4
LAYOUTS = {"pp2_dp2_ep2": ["parallel.pp=2", "parallel.ep=2"], "pp1_dp4_ep2": ["parallel.pp=1", "parallel.ep=2"]}


def predicted(layout: str, engine=TODAY, act_bytes=None, ep_attention=None) -> list[dict]:
    """Per stage: {category: {op: bytes per rank per step}} from the planner, for the run's config."""
    inp = inputs_from_config(compose_config(RUN + LAYOUTS[layout] + [f"cluster.gpus={WORLD}"]))
    lay = inp.layout if ep_attention is None else dataclasses.replace(inp.layout, ep_attention=ep_attention)
    stages = stage_params(inp.shape, count_params(inp.shape), lay, engine.partition_balances, inp.seq_len)
    m = inp.global_batch // (lay.dp * inp.micro_batch)
    traffic = step_traffic(inp.shape, stages, lay, inp.micro_batch * inp.seq_len, m,
                           act_bytes or inp.precision.act_bytes, inp.precision.param_bytes, inp.checkpointing, engine)
    out = []
    for t in traffic:
        by: dict = {}
        for x in t.transfers:
            op = {"all_gather": "all_gather_into_tensor", "all_to_all": "all_to_all_single"}.get(x.op, x.op)
            by.setdefault(x.category, {}).setdefault(op, 0)
            by[x.category][op] += x.payload_bytes
        out.append(by)
    return out


def mismatches(measured: list[dict], model: list[dict]) -> list[str]:
    """Every (stage, category, op) whose prediction is off by more than TOLERANCE, and every category total."""
    bad = []
    for stage, (got, want) in enumerate(zip(measured, model)):
        for category in CATEGORIES:
            g = {op: n for op, n in got.get(category, {}).items() if op != "recv"}  # the planner counts what is sent
            w = want.get(category, {})
            pairs = [(op, g.get(op, 0), w.get(op, 0)) for op in sorted(set(g) | set(w))]
            pairs.append(("total", sum(g.values()), sum(w.values())))
            for op, a, b in pairs:
                if abs(a - b) > TOLERANCE * max(a, b):
                    bad.append(f"stage {stage} {category} {op}: measured {a:,.0f} B, predicted {b:,.0f} B")
    return bad


def spy_run(tmp_path_factory, layout: str) -> list[dict]:
    """Per stage, the mean over its ranks of the spy's bytes per rank per step."""
    tmp = tmp_path_factory.mktemp(layout)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JETMOE_CACHE_DIR": os.environ.get("JETMOE_CACHE_DIR",
                                                                                    str(tmp / "cache"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "tests/helpers/traffic_spy.py", str(tmp / "out"), str(STEPS),
           str(tmp / "run"), *RUN, *LAYOUTS[layout]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp / "out").glob("rank*.json"))]
    pp = records[0]["pp"]
    assert len(records) == WORLD and {r["ep"] for r in records} == {2}
    stages: list[dict] = [{} for _ in range(pp)]
    for r in records:
        for category, ops in r["bytes"].items():
            for op, n in ops.items():
                by = stages[r["stage"]].setdefault(category, {})
                by[op] = by.get(op, 0) + n / (WORLD // pp)
    print(f"{layout} measured per stage:", json.dumps(stages))
    return stages


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> list[dict]:
    return spy_run(tmp_path_factory, "pp2_dp2_ep2")


def test_planner_bytes_match_the_counted_bytes_for_dp_pp_and_ep(measured):
    model = predicted("pp2_dp2_ep2")
    print("predicted per stage:", json.dumps(model))
    for stage in measured:
        assert all(stage.get(c) for c in CATEGORIES), stage  # the run moved data of every kind
        assert not stage.get("world"), stage  # no data travels on the whole world's group
    assert measured[0]["pp"]["recv"] == measured[1]["pp"]["send"] and measured[1]["pp"]["recv"] == measured[0]["pp"]["send"]
    assert mismatches(measured, model) == []


def test_expert_gradients_reduced_over_the_expert_data_group(tmp_path_factory):
    got = spy_run(tmp_path_factory, "pp1_dp4_ep2")
    model = predicted("pp1_dp4_ep2")
    print("predicted:", json.dumps(model))
    dense_only = predicted("pp2_dp2_ep2")  # the same model's dense share alone would undercount the reduction
    assert got[0]["dp"]["all_reduce"] > dense_only[0]["dp"]["all_reduce"]
    assert not got[0].get("pp") and not got[0].get("world")
    assert mismatches(got, model) == []


@pytest.mark.parametrize("wrong,category", [
    ({"engine": dataclasses.replace(TODAY, dp_reduce_bytes=2)}, "dp"),  # DeepSpeed's default: bf16 reduction
    ({"engine": dataclasses.replace(TODAY, weight_gather_bytes=4)}, "dp"),  # fp32 weights gathered
    ({"engine": dataclasses.replace(TODAY, tied_reduce_bytes=2)}, "pp"),  # the tied gradient in bf16
    ({"act_bytes": 4}, "pp"),  # fp32 activations between stages (and in the all-to-alls)
    ({"ep_attention": False}, "ep"),  # only the MoE's experts dispatched
])
def test_a_wrong_model_fails_the_comparison(measured, wrong, category):
    bad = mismatches(measured, predicted("pp2_dp2_ep2", **wrong))
    assert any(f" {category} " in line for line in bad), bad
