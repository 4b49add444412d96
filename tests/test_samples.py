"""Samples while training (train.sample_every): greedy and temperature continuations written to samples.jsonl,
the console and a wandb table, computed through the pipeline's stages (pp=3 under torchrun)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.launch_util import ROOT, TINY_RUN

from jetmoe.errors import JetMoEError
from jetmoe.training.sampling import pick_tokens, prompt_window

PROMPTS = ["The history of", "Once upon a time"]
TOKENS = 6


def _plain_greedy(model, tokenizer, eos: int, prompt: str, tokens: int) -> str:
    ids = [eos] + tokenizer.encode(prompt, add_special_tokens=False).ids
    new = []
    with torch.no_grad():
        for _ in range(tokens):
            nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
    if eos in new:
        new = new[:new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=False)


@pytest.mark.slow
def test_samples_through_three_pipeline_stages_are_the_plain_models_greedy_continuations(tmp_path):
    from tokenizers import Tokenizer

    from jetmoe import JetMoEForCausalLM
    from jetmoe.training.checkpoint.export import export_hf

    run_dir = tmp_path / "run"
    prompts = "[" + ",".join(f"'{p}'" for p in PROMPTS) + "]"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           str(ROOT / "train/pretrain.py"), "parallel=pp3", *TINY_RUN, "train.max_steps=2", "train.sample_every=2",
           f"train.sample_tokens={TOKENS}", f"train.sample_prompts={prompts}", "checkpoint.every=2",
           "logging.wandb.mode=offline", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"], r["prompt"]) for r in records] == [
        (2, kind, p) for kind in ("greedy", "temperature") for p in PROMPTS]
    assert (proc.stdout + proc.stderr).count("samples at step 2:") == 1  # rank 0 only

    # The greedy rows are what the trained weights, run as one plain model, continue the prompts with.
    export = export_hf(run_dir, tmp_path / "hf", dtype="fp32", log=lambda s: None)
    model = JetMoEForCausalLM.from_pretrained(export).eval()
    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = json.loads((export / "config.json").read_text())["eos_token_id"]
    assert any(r["text"] for r in records[:len(PROMPTS)])  # not merely two empty strings
    for r in records[:len(PROMPTS)]:
        assert r["text"] == _plain_greedy(model, tokenizer, eos, r["prompt"], TOKENS), r

    # The same rows as a wandb table.
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/samples_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["step", "prompt", "kind", "text"]
    assert table["data"] == [[r["step"], r["prompt"], r["kind"], r["text"]] for r in records]


def test_prompt_window_right_pads_and_keeps_the_last_tokens_of_long_prompts():
    ids, lengths = prompt_window([[5, 6, 7], [8]], new_tokens=2, max_positions=16, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]] and lengths.tolist() == [3, 1]
    ids, lengths = prompt_window([list(range(1, 11))], new_tokens=4, max_positions=8, pad_id=0)
    assert ids[0, :4].tolist() == [7, 8, 9, 10] and lengths.tolist() == [4]
    with pytest.raises(JetMoEError, match="train.sample_tokens"):
        prompt_window([[1]], new_tokens=8, max_positions=8, pad_id=0)


def test_pick_tokens_is_argmax_for_greedy_rows_and_follows_the_temperature_for_the_others():
    logits = torch.tensor([[0.0, 3.0, 1.0]] * 2000)
    picked = pick_tokens(logits, 1000, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert picked[:1000].eq(1).all()
    share = torch.bincount(picked[1000:], minlength=3).float() / 1000
    torch.testing.assert_close(share, torch.softmax(logits[0], -1), atol=0.05, rtol=0)
    cold = pick_tokens(logits, 0, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert cold.eq(1).all()
