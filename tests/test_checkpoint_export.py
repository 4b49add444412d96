"""train/export_hf.py: checkpoint -> transformers directory (sharded safetensors + index, bf16 or fp32)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import TrainingState, save
from jetmoe.training.checkpoint.export import export_hf
from helpers.ckpt_tiny import make_run, tiny_config, train_steps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model, opt, sched, loader = make_run(tiny_config())
    train_steps(model, opt, sched, loader, 2)
    folder = save(root, 2, model, opt, TrainingState(step=2, states={"scheduler": sched, "data": loader}),
                  model_config=model.config)
    return model.eval(), folder


def _ids(model):
    return torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_loads_in_transformers_with_training_logits(trained, tmp_path, dtype):
    transformers = pytest.importorskip("transformers")
    model, folder = trained
    out = export_hf(folder.parent, tmp_path / "hf", dtype=dtype, max_shard_size="40KB", log=lambda s: None)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    exported = {k: v for s in shards for k, v in load_file(out / s).items()}
    params = dict(model.named_parameters())
    assert set(exported) == set(params) - {"lm_head.weight"}
    for name, t in exported.items():
        assert t.dtype == want and torch.equal(t, params[name].detach().to(want)), name

    hf = transformers.JetMoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(model)
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf(ids).logits
    if dtype == "fp32":
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    else:  # bf16 weights: logits agree to bf16 rounding of the weights
        assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


@pytest.mark.slow
def test_cli_refuses_non_empty_output_and_damaged_checkpoint(trained, tmp_path):
    _, folder = trained
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run = subprocess.run([sys.executable, str(ROOT / "train/export_hf.py"), str(folder), str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "not empty" in run.stderr and "Traceback" not in run.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1

    damaged = tmp_path / "damaged" / folder.name
    shutil.copytree(folder, damaged)
    weights = damaged / "model-pp00.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(JetMoEError, match="model-pp00.safetensors"):
        export_hf(damaged, tmp_path / "never", log=lambda s: None)
    assert not (tmp_path / "never").exists()


def test_an_output_under_a_file_is_one_line_before_the_checkpoint_is_read(trained, tmp_path):
    """Issue 21 item 14: OUT_DIR whose parent is a file gave a raw NotADirectoryError."""
    _, folder = trained
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(JetMoEError) as refused:
        export_hf(folder, tmp_path / "a-file" / "export", log=lambda s: None)
    assert str(refused.value) == (f"output folder {tmp_path / 'a-file' / 'export'} is not writable "
                                  f"({tmp_path / 'a-file'} is a file); choose another OUT_DIR")
    assert (tmp_path / "a-file").read_text() == "mine"
