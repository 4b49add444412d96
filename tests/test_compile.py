"""train.compile: the compiled blocks train like the eager ones (fp32 per-step losses within 1e-5 relative) at
pp=1 and at pp=3 x ep=2, and Dynamo compiles nothing after step 2 although the expert counts change every step."""

import copy
import os
from pathlib import Path

import pytest
import torch

from helpers.launch_util import E2E_LOSSES as LOSSES, E2E_STEPS as STEPS, run_driver

from jetmoe.errors import JetMoEError
from jetmoe.model import JetMoEConfig, JetMoEForCausalLM, set_document_mask
from jetmoe.parallel.compile import compile_blocks, compile_enabled
from jetmoe.training.config import TrainSection

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "helpers" / "compile_e2e.py"


def _train(tmp_path, world, overrides):
    out = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), JETMOE_CACHE_DIR=str(tmp_path / "cache"))
    log = run_driver(DRIVER, out, world, ["train.precision=fp32", *overrides], env, timeout=600)
    return torch.load(out / "result.pt"), log


@pytest.mark.slow
@pytest.mark.parametrize("world,layout", [
    (1, []),
    (6, ["parallel.pp=3", "parallel.ep=2", "parallel.activation_checkpointing=true", "data.document_mask=true"]),
], ids=["pp1", "pp3_ep2"])
def test_compiled_training_matches_eager(tmp_path, world, layout):
    eager, _ = _train(tmp_path, world, [*layout, "train.compile=false"])
    compiled, log = _train(tmp_path, world, [*layout, "train.compile=true",
                                             f"train.compile_cache_dir={tmp_path / 'inductor'}"])
    assert compiled["compiled"] and not eager["compiled"]
    for row, ref in zip(compiled["rows"], eager["rows"], strict=True):
        for key in LOSSES:
            assert row[key] == pytest.approx(ref[key], rel=1e-5), (row["step"], key)
    # the routing differed between steps (so unchanged graphs prove counts never entered one)
    loads = [tuple(map(tuple, r["router"]["share_moe"])) for r in compiled["rows"]]
    assert len(set(loads)) == STEPS
    for rank_stats in compiled["stats"]:
        assert rank_stats[0]["graphs"] > 0
        assert rank_stats[-1]["frames"] == rank_stats[1]["frames"], rank_stats  # nothing compiled after step 2
    assert eager["stats"][0][-1]["frames"] == 0
    assert log.count("compile: ") == 1  # logged once (rank 0)
    assert any((tmp_path / "inductor").iterdir())  # Inductor's cache where train.compile_cache_dir says


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_gradients():
    """In one process: the objective and every parameter's gradient through the compiled blocks (one graph each,
    MoA and MoE and their router losses) equal eager's, over steps whose routing differs."""
    config = JetMoEConfig.preset("jetmoe_tiny", hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                 kv_channels=8, intermediate_size=32, vocab_size=128)
    torch.manual_seed(0)
    eager = JetMoEForCausalLM(config)
    set_document_mask(eager, "off")
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled.model.layers) == 2
    for step in range(2):
        ids = torch.randint(0, config.vocab_size, (2, 16))
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            losses.append(model(ids, labels=ids).loss)
            losses[-1].backward()
        assert float(losses[1]) == pytest.approx(float(losses[0]), rel=1e-6)
        for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
            assert float((p.grad - q.grad).abs().max()) <= 1e-5 * float(p.grad.abs().max()), (step, name)


def test_compile_modes():
    assert compile_enabled("auto", cuda=True) and not compile_enabled("auto", cuda=False)
    assert compile_enabled("true", cuda=False) and compile_enabled(True, cuda=False)
    assert not compile_enabled("false", cuda=True)
    with pytest.raises(JetMoEError, match="train.compile"):
        TrainSection(compile="yes").check()


@pytest.mark.slow
def test_flex_attention_compiles_inside_the_block_graph(monkeypatch):
    """data.document_mask=true with train.compile: FlexAttention's block mask goes into each compiled block, which
    stays one graph with no break (nothing inside it compiles again or changes module state). On CPU FlexAttention
    runs its forward only, so the check is an evaluation forward; the logits equal eager's dense-mask logits."""
    import torch._dynamo

    from jetmoe.model import masking
    from jetmoe.parallel.compile import compile_stats

    monkeypatch.setattr(masking, "use_flex", True)
    config = JetMoEConfig.preset("jetmoe_tiny", hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
                                 kv_channels=8, intermediate_size=32, vocab_size=128)
    torch.manual_seed(0)
    eager = JetMoEForCausalLM(config).eval()
    set_document_mask(eager, "on")
    compiled = copy.deepcopy(eager)
    ids = torch.randint(0, config.vocab_size, (2, 32))
    pos = torch.cat([torch.arange(12), torch.arange(20)]).expand(2, -1)
    torch._dynamo.reset()
    before = compile_stats()
    compile_blocks(compiled.model.layers)
    with torch.no_grad():
        assert isinstance(masking.attention_mask(pos, "on"), masking.FlexMask)
        got = compiled(ids, position_ids=pos).logits
        monkeypatch.setattr(masking, "use_flex", False)
        want = eager(ids, position_ids=pos).logits
    after = compile_stats()
    assert after["graphs"] - before["graphs"] == 1 and after["graph_breaks"] == before["graph_breaks"], (before, after)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compile_at_scale_defaults(monkeypatch, tmp_path):
    """Inductor's cache on the node's own disk and its workers shared by the node's ranks, unless the user set
    either; the user's TORCHINDUCTOR_CACHE_DIR wins over train.compile_cache_dir."""
    import torch._inductor.config as inductor

    from jetmoe.parallel.compile import cap_compile_threads, node_local_cache_dir, ranks_on_this_node, use_cache_dir

    for key in ("SLURM_TMPDIR", "TMPDIR", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "TORCHINDUCTOR_CACHE_DIR",
                "TORCHINDUCTOR_COMPILE_THREADS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(inductor, "compile_threads", inductor.compile_threads)
    assert node_local_cache_dir().parent == Path("/tmp")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setenv("SLURM_TMPDIR", str(tmp_path / "slurm"))
    assert node_local_cache_dir().parent == tmp_path / "slurm"
    assert use_cache_dir(None) == node_local_cache_dir()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_cache_dir(tmp_path / "configured") == tmp_path / "mine"
    assert ranks_on_this_node() == 1
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x12)")
    assert ranks_on_this_node() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ranks_on_this_node() == 4
    cores = len(os.sched_getaffinity(0))
    assert cap_compile_threads() == max(1, cores // 4) and os.environ["TORCHINDUCTOR_COMPILE_THREADS"] == str(max(1, cores // 4))
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "3")
    monkeypatch.setattr(inductor, "compile_threads", 3)
    assert cap_compile_threads() == 3  # the user's choice stands
