"""Mixture weights too small to draw anything are said, never silently turned into 0 samples."""

import pytest
from helpers.data_mixture import MAX_POS, VOCAB, mixture_cfg, write_corpus

from jetmoe.data import build_data
from jetmoe.data.mixture_build import pretokenize_mixture
from jetmoe.data.mixture_config import parse_mixture
from jetmoe.data.mixture_schedule import MixtureSampler
from jetmoe.errors import JetMoEError

SOURCES = {"code": {"path": "/c", "weight": 0.3}, "web": {"path": "/w", "weight": 0.7}}


@pytest.mark.parametrize("where", ["sources", "phases"])
def test_a_weight_below_the_representable_step_is_refused_naming_it(where):
    if where == "sources":
        sources, phases, key = {**SOURCES, "code": {"path": "/c", "weight": 1e-12}}, [], "data.sources.code.weight"
    else:
        sources, phases = SOURCES, [{"start_step": 0, "weights": {"web": 1, "code": 1e-12}}]
        key = "data.phases[0].weights.code"
    with pytest.raises(JetMoEError) as err:
        parse_mixture(sources, phases)
    message = str(err.value)
    assert message.startswith(f"{key}=1e-12 is below the smallest weight") and "\n" not in message
    smallest = float(message.split("give at least ")[1].split(",")[0])
    tiny = parse_mixture({**SOURCES, "code": {"path": "/c", "weight": smallest}}, [])
    assert tiny.phases[0].weights[tiny.names.index("code")] > 0  # the weight it names is kept


def test_a_weight_too_small_for_the_run_is_a_warning_naming_the_source_and_the_smallest_that_draws():
    phases = [{"start_step": 0, "weights": {"web": 1, "code": 1e-6}},
              {"start_step": 10, "weights": {"web": 1, "code": 1}}]
    sampler = MixtureSampler(parse_mixture(SOURCES, phases), [1000, 1000], 20, 0)
    lines = sampler.unsampled(end_step=30)
    assert len(lines) == 1 and "'code' draws no sample in phase 0 (steps 1-10, 200 samples)" in lines[0]
    assert all((sampler.batch(step)[0] != 0).all() for step in range(10))  # code (index 0) truly never drawn
    smallest = float(lines[0].split("is below ")[1].split(",")[0])
    enough = [{"start_step": 0, "weights": {"web": 1, "code": smallest}}, phases[1]]
    fixed = MixtureSampler(parse_mixture(SOURCES, enough), [1000, 1000], 20, 0)
    assert fixed.unsampled(end_step=30) == [] and fixed.consumed_before(10)[0] >= 1
    assert sampler.unsampled(end_step=5)[0].endswith("raise it, or give it 0") and "steps 1-5" in sampler.unsampled(5)[0]


def test_the_trainer_s_loader_warns_once_from_rank_0(tmp_path, tmp_path_factory):
    sources = write_corpus(tmp_path / "corpus")
    sources["code"]["weight"] = 1e-7
    cfg = mixture_cfg(tmp_path, tmp_path_factory, sources)
    pretokenize_mixture(cfg, VOCAB)
    lines = []
    data = build_data(cfg, VOCAB, MAX_POS, log=lines.append)
    lines.clear()
    data.train_loader(20, 5, dp_rank=1, dp_size=2, max_steps=10)
    assert lines == []
    data.train_loader(20, 5, dp_rank=0, dp_size=2, max_steps=10)
    assert len(lines) == 1 and lines[0].startswith("warning: data source 'code' draws no sample")
