"""plan.search=true: the layouts that fit, ranked by predicted tokens/s, each with the costs that decide it."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import plan as plan_cli  # noqa: E402
from helpers.plan_config import compose_config  # noqa: E402

from jetmoe.plan import inputs_from_config, make_plan  # noqa: E402
from jetmoe.plan.search import search_layouts  # noqa: E402
from jetmoe.plan.step import KEYS  # noqa: E402

RECIPE = ["+experiment=jetmoe_8b_96xh100"]


@pytest.fixture(scope="module")
def ranked():
    inp = inputs_from_config(compose_config(RECIPE))
    return inp, search_layouts(inp)


def test_every_layout_listed_fits_and_they_come_fastest_first(ranked):
    inp, candidates = ranked
    assert len(candidates) > 10
    speeds = [c.plan.tokens_per_sec for c in candidates]
    assert speeds == sorted(speeds, reverse=True)
    for c in candidates:
        assert c.plan.fits and c.pp * c.dp == inp.layout.gpus and c.dp % c.ep == 0
        assert inp.global_batch % (c.dp * c.micro_batch) == 0
        assert all(name in KEYS for name in (part.split()[0] for part in c.reason.split(", ")))
    assert {c.recompute for c in candidates} == {False, True}
    assert len({c.micro_batch for c in candidates}) > 1 and len({c.pp for c in candidates}) > 1


def test_the_configured_layout_is_ranked_with_the_plan_it_gets_alone(ranked):
    inp, candidates = ranked
    alone = make_plan(inp)
    mine = [c for c in candidates if (c.pp, c.ep, c.micro_batch, c.recompute) == (3, 1, 1, False)]
    assert len(mine) == 1 and mine[0].plan.step_seconds == pytest.approx(alone.step_seconds, rel=1e-9)


def test_pp3_dp32_against_pp3_ep8_says_why(ranked, capsys):
    _, candidates = ranked
    dense = next(c for c in candidates if (c.pp, c.ep, c.micro_batch, c.recompute) == (3, 1, 1, False))
    expert = next(c for c in candidates if (c.pp, c.ep, c.micro_batch, c.recompute) == (3, 8, 1, False))
    # ep=8 keeps an eighth of the experts per rank: less to sweep per micro-batch, all-to-alls to pay
    assert expert.plan.step.parts["grad_accumulation"] < dense.plan.step.parts["grad_accumulation"]
    assert expert.plan.step.parts["all_to_all"] > 0 == dense.plan.step.parts["all_to_all"]
    assert "grad_accumulation" in dense.reason and "all_to_all" in expert.reason
    assert plan_cli.main([*RECIPE, "plan.search=true", "plan.search_top=40"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    rows = summary["search"]
    assert len(rows) == 40 and rows[0]["tokens_per_sec"] >= rows[-1]["tokens_per_sec"]
    assert any(line.startswith("layouts that fit 96 x h100") for line in out)
    assert any(line.startswith("the configured layout (pp=3 ep=1 mb=1) ranks ") for line in out)
    assert "total_params" in summary and "step_breakdown_s" in summary
