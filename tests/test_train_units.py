"""Trainer pieces that need no engine: config tree, LR schedules, batch arithmetic, layout checks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from jetmoe.errors import JetMoEError
from jetmoe.model import JetMoEConfig
from jetmoe.plan.params import ModelShape
from jetmoe.parallel.topology import make_layout, split_blocks
from jetmoe.training.cli import strip_local_rank
from jetmoe.training.compose import compose
from jetmoe.data.loader import micro_batches_per_step as grad_accumulation
from jetmoe.training.config import OptimSection, precision
from jetmoe.training.engine import deepspeed_config
from jetmoe.training.schedules import lr_multiplier

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- config
def test_flops_partition_weighs_blocks_and_head_by_training_flops():
    from jetmoe.parallel.pipeline import block_weights
    from jetmoe.plan.params import count_params
    from jetmoe.plan.throughput import flops_per_token

    config = JetMoEConfig.preset("jetmoe_8b")
    weights = block_weights(config, "flops", seq_len=4096)
    shape = ModelShape.from_config(config)
    assert sum(weights) == sum(flops_per_token(shape, count_params(shape), 4096))  # the planner's FLOPs, split
    assert weights[-1] - weights[0] == 6 * (config.vocab_size + 1) * config.hidden_size  # head + norm, last block
    # 24 blocks on 3 stages: the head is ~0.6 of a block, no whole-block move beats 8/8/8
    assert split_blocks(24, 3, "flops", weights) == [8, 8, 8]
    # a vocabulary that outweighs blocks: the last stage takes fewer blocks
    small = JetMoEConfig.preset("jetmoe_tiny", hidden_size=64, num_hidden_layers=6, vocab_size=32000)
    assert split_blocks(6, 2, "flops", block_weights(small, "flops", seq_len=256)) == [5, 1]


@pytest.mark.parametrize("preset", ["jetmoe_tiny", "jetmoe_8b"])
def test_model_group_files_equal_the_presets(preset, run_config):
    config = run_config(f"model={preset}")
    assert config.model.to_dict() == JetMoEConfig.preset(preset).to_dict()
    assert config.resolved["model"]["name"] == preset


def test_typo_in_a_key_fails_with_not_in_struct(run_config):
    with pytest.raises(JetMoEError) as e:
        run_config("train.lrr=1e-3")
    assert "lrr" in str(e.value) and "not in" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(JetMoEError, match="hiden_size"):
        run_config("model.hiden_size=64")


def test_model_overrides_reach_the_model_config(run_config):
    config = run_config("model.hidden_size=64", "model.num_hidden_layers=2", "parallel.partition=[1,1]")
    mc = config.model
    assert (mc.hidden_size, mc.num_hidden_layers) == (64, 2)
    assert list(config.parallel.partition) == [1, 1]


def test_contract_keys_exist():
    cfg = compose([])
    for key in ("data.path", "data.text_field", "data.seq_len", "data.tokenizer", "train.max_steps",
                "train.global_batch_size", "train.micro_batch_size", "train.seed", "train.lr", "parallel.pp",
                "parallel.ep", "checkpoint.every", "checkpoint.dir", "checkpoint.resume",
                "logging.wandb.mode", "cluster.gpus"):
        OmegaConf.select(cfg, key, throw_on_missing=False)  # raises if absent from the schema
        parent, _, leaf = key.rpartition(".")
        assert leaf in OmegaConf.select(cfg, parent), key


@pytest.mark.slow
def test_bad_override_fails_in_one_line_without_traceback():
    proc = subprocess.run([sys.executable, str(REPO / "train/pretrain.py"), "train.max_stepz=3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0
    err = [line for line in proc.stderr.splitlines() if line.strip() and "WARNING" not in line]
    assert len(err) == 1, proc.stderr
    assert "max_stepz" in err[0] and "Traceback" not in proc.stderr
    assert proc.stdout == ""  # failed before anything ran


@pytest.mark.slow
def test_cfg_job_prints_the_config():
    proc = subprocess.run([sys.executable, str(REPO / "train/pretrain.py"), "--cfg", "job", "parallel.pp=3"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.parallel.pp == 3 and cfg.model.name == "jetmoe_tiny"


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert strip_local_rank(["--local_rank=2", "a=1", "--local_rank", "3", "b=2"]) == ["a=1", "b=2"]
    import os

    assert os.environ["LOCAL_RANK"] == "2"


# ----------------------------------------------------------------------------------- LR schedules
def test_cosine_schedule_shape():
    f = lr_multiplier("cosine", max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [f(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warmup rises linearly
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then never rises
    assert lrs[-1] == pytest.approx(0.1)
    mid = 10 + (100 - 10) // 2  # half-way through the decay the cosine is half-way down
    assert f(mid - 1) == pytest.approx(0.55, abs=0.02)


@pytest.mark.parametrize("shape", ["exp", "linear", "cosine"])
def test_wsd_schedule_shape(shape):
    f = lr_multiplier("wsd", max_steps=200, warmup_steps=20, min_lr_ratio=0.1, decay_fraction=0.25,
                      decay_shape=shape)
    lrs = [f(s) for s in range(200)]
    assert lrs[:20] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert set(lrs[19:150]) == {1.0}  # stable phase
    decay = lrs[150:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decays over the last 25%
    assert decay[-1] == pytest.approx(0.1) and decay[0] < 1.0
    if shape == "exp":  # geometric: constant ratio between steps
        ratios = [b / a for a, b in zip(decay, decay[1:])]
        assert max(ratios) == pytest.approx(min(ratios))


def test_schedule_errors_name_the_key():
    with pytest.raises(JetMoEError, match="optim.schedule"):
        OptimSection(schedule="linearish", warmup_steps=1, min_lr_ratio=0.1).check()
    with pytest.raises(JetMoEError, match="optim.min_lr_ratio"):
        OptimSection(schedule="cosine", warmup_steps=1, min_lr_ratio=0.0).check()


# ---------------------------------------------------------------------------- batch arithmetic
def test_grad_accumulation():
    assert grad_accumulation(16, 4, 1) == 4
    assert grad_accumulation(16, 2, 2) == 4
    assert grad_accumulation(12, 2, 3) == 2


@pytest.mark.parametrize("G,mb,dp", [(10, 4, 1), (16, 3, 2), (8, 4, 4)])
def test_grad_accumulation_errors_are_clear(G, mb, dp):
    with pytest.raises(JetMoEError) as e:
        grad_accumulation(G, mb, dp)
    msg = str(e.value)
    assert f"train.global_batch_size={G}" in msg and f"micro_batch_size={mb}" in msg and f"dp={dp}" in msg
    assert "\n" not in msg
    suggested = [int(w.split("=")[1].rstrip(",")) for w in msg.split() if w.startswith("train.global_batch_size=")]
    assert all(s % (mb * dp) == 0 for s in suggested[1:])  # the fixes it suggests do divide


def test_generated_deepspeed_config_and_file_override(tmp_path, run_config):
    cfg = run_config("train.global_batch_size=16", "train.micro_batch_size=2", "optim.grad_clip=0.5")
    ds = deepspeed_config(cfg.train, cfg.optim, dp=2, bf16=precision(cfg.train, cuda=False) == "bf16")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 1 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is False  # CPU: fp32
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_clipping": 2.0, "zero_optimization": {"reduce_bucket_size": 1000}}))
    cfg.train.deepspeed_config = str(user)
    ds = deepspeed_config(cfg.train, cfg.optim, dp=2, bf16=False)
    assert ds["gradient_clipping"] == 2.0 and ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 1000}
    user.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(JetMoEError, match="train_batch_size"):
        deepspeed_config(cfg.train, cfg.optim, dp=2, bf16=False)


# ---------------------------------------------------------------------------------------- layout
def test_layout_ranks_are_pipe_major():
    layouts = [make_layout(6, r, pp=3, ep=2, num_layers=6, num_experts=4) for r in range(6)]
    assert [(l.stage, l.dp_rank, l.ep_rank) for l in layouts] == [
        (0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (2, 0, 0), (2, 1, 1)]
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    topo = PipeDataParallelTopology(num_pp=3, num_dp=2)
    assert all(topo.get_coord(l.rank).pipe == l.stage and topo.get_coord(l.rank).data == l.dp_rank
               for l in layouts)


@pytest.mark.parametrize("world,pp,ep,layers,experts,words", [
    (4, 3, 1, 6, 4, ["world size 4", "parallel.pp=3"]),
    (3, 3, 1, 2, 4, ["parallel.pp=3", "2 layers"]),
    (6, 3, 4, 6, 8, ["parallel.ep=4", "dp=2"]),
    (4, 1, 4, 6, 6, ["parallel.ep=4", "6"]),
])
def test_layout_errors_name_the_numbers(world, pp, ep, layers, experts, words):
    with pytest.raises(JetMoEError) as e:
        make_layout(world, 0, pp, ep, layers, experts)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_split_blocks():
    assert split_blocks(24, 3, "uniform") == [8, 8, 8]
    assert split_blocks(7, 3, "uniform") == [2, 2, 3]
    assert split_blocks(6, 3, [1, 2, 3]) == [1, 2, 3]
    # embedding and head weigh on the end stages: they get fewer blocks
    assert split_blocks(8, 3, "parameters", [9, 1, 1, 1, 1, 1, 1, 9]) == [1, 6, 1]
    with pytest.raises(JetMoEError, match="sum"):
        split_blocks(6, 3, [1, 1, 1])
    with pytest.raises(JetMoEError, match="partition"):
        split_blocks(6, 3, "random")


@pytest.mark.parametrize("preset", ["jetmoe_tiny", "jetmoe_8b"])
def test_parameter_count_behind_mfu_matches_the_model(preset):
    import torch

    from jetmoe.model import JetMoEForCausalLM
    from jetmoe.plan.params import count_params
    from jetmoe.training.metrics import flops_per_token

    config = JetMoEConfig.preset(preset)
    with torch.device("meta"):
        model = JetMoEForCausalLM(config)
    counts = count_params(config)
    total, active = counts.total, counts.active
    assert total == sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if "input_linear" in n or "output_linear" in n)
    k_over_e = config.num_experts_per_tok / config.num_local_experts
    assert active == total - expert + expert * k_over_e
    seq = 128
    # causal attention: half of QK^T + AV over all seq keys, forward (x1) and backward (x2)
    attention = 3 * 2 * 2 * config.num_hidden_layers * seq * config.num_key_value_heads * config.kv_channels \
        * config.num_experts_per_tok / 2
    assert flops_per_token(config, seq) == 6 * (active - counts.head) + attention


def test_jetmoe_8b_flops_per_token_at_4096():
    from jetmoe.plan.params import count_params
    from jetmoe.training.metrics import flops_per_token

    config = JetMoEConfig.preset("jetmoe_8b")
    dense = 6 * count_params(config).flops_params
    assert round(dense / 1e9, 2) == 13.99  # 6 x 2.33B active
    assert round((flops_per_token(config, 4096) - dense) / 1e9, 2) == 2.42  # causal attention, Megatron's count
    assert round(flops_per_token(config, 4096) / 1e9, 2) == 16.40


def test_resumed_metrics_drop_rows_after_the_resumed_step(tmp_path, run_config):
    from jetmoe.training.metrics import MetricsLogger

    cfg = run_config("logging=quiet")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"st')
    logger = MetricsLogger(tmp_path, cfg.logging, enabled=True, max_steps=10)
    logger.set_start(2)  # the checkpoint was at step 2; steps 3, 4 and a torn line came after it
    logger.log({"step": 3, "lm_loss": 1.0})
    logger.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.slow
def test_plot_renders_every_curve(tmp_path):
    rows = []
    for step in range(1, 6):
        row = {"step": step, "lm_loss": 8.0 - step, "aux_loss": 0.1, "lr": 1e-3 * step, "tokens_per_sec": 1000.0}
        if step % 2 == 0:
            row["eval_loss"] = 8.2 - step
            row["router"] = {"share_moa": [[0.25] * 4] * 3, "share_moe": [[0.4, 0.2, 0.2, 0.2]] * 3}
        rows.append(row)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, str(REPO / "train/plot.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["expert_load.png", "losses.png", "lr.png", "throughput.png"]
    assert all((tmp_path / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names)
    missing = subprocess.run([sys.executable, str(REPO / "train/plot.py"), str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and missing.stderr.strip().startswith("error:")
