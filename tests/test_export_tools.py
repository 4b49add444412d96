"""A real tiny run, exported with train/export_hf.py, opens in the tools people use on a transformers model:
AutoTokenizer + AutoModelForCausalLM (the step folder itself too), pipeline("text-generation") and
lm-evaluation-harness's `hf` model on a small local task; with the builtin BPE and with a user's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jetmoe import JetMoEForCausalLM
from jetmoe.data.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow  # every test here starts processes

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.num_key_value_heads=2", "model.kv_channels=16", "model.intermediate_size=64",
        "model.num_hidden_layers=2", "data.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=2", "train.eval_every=0", "logging=quiet", "optim.warmup_steps=1", "checkpoint.every=2",
        "logging.wandb.mode=disabled"]
TEXT = "def read(path):\n    return open(path).read()\n\nThe function returns the list of values it read.\n"


def _run(*cmd: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def _train_and_export(root: Path, *overrides: str) -> tuple[Path, Path]:
    run_dir, out = root / "run", root / "hf"
    proc = _run(str(ROOT / "train/pretrain.py"), *TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(str(ROOT / "train/export_hf.py"), str(run_dir), str(out), "--dtype", "fp32", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with tokenizer" in proc.stdout
    return run_dir / "checkpoints" / "step_00000002", out


@pytest.fixture(scope="module")
def builtin_export(tmp_path_factory):
    return _train_and_export(tmp_path_factory.mktemp("builtin"))


@pytest.fixture(scope="module")
def user_export(tmp_path_factory):
    """A user's tokenizer.json with <s>, </s> and <unk>, trained here on the corpus it is used with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("user")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT * 200)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                 show_progress=False))
    tok.save(str(root / "user-tokenizer.json"))
    return _train_and_export(root, "data=files", f"data.path={corpus}", "data.txt_sample_by=line",
                             f"data.tokenizer={root / 'user-tokenizer.json'}", f"data.cache_dir={root / 'cache'}")


def _check_tokenizer_and_model(folder: Path, want_bos: str, want_eos: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    config = json.loads((folder / "config.json").read_text())
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (tok.bos_token, tok.eos_token) == (want_bos, want_eos)
    assert tok.bos_token_id == config["bos_token_id"] == generation["bos_token_id"] == model.config.bos_token_id
    assert tok.eos_token_id == config["eos_token_id"] == generation["eos_token_id"] == model.config.eos_token_id
    # the tokenizer the run trained with: same ids as the run's own encoder
    ours = load_tokenizer(str(folder / "tokenizer.json"), Path)
    assert tok(TEXT, add_special_tokens=False).input_ids == ours.encode(TEXT)
    assert tok.decode(ours.encode(TEXT)) == TEXT
    ids = torch.tensor([ours.encode(TEXT)[:20]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, JetMoEForCausalLM.from_pretrained(folder)(ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_builtin_export_and_step_folder_open_with_auto_classes(builtin_export):
    step_folder, out = builtin_export
    for folder in (out, step_folder):
        _check_tokenizer_and_model(folder, "<|endoftext|>", "<|endoftext|>")


def test_user_tokenizer_export_keeps_its_special_tokens(user_export):
    step_folder, out = user_export
    for folder in (out, step_folder):
        _check_tokenizer_and_model(folder, "<s>", "</s>")


def test_text_generation_pipeline_generates_from_the_export(builtin_export):
    _, out = builtin_export
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    prompt = "The function returns"
    text = generate(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert text.startswith(prompt) and len(tok(text).input_ids) > len(tok(prompt).input_ids)


def test_lm_eval_harness_scores_the_export_with_our_model_likelihoods(builtin_export, tmp_path):
    """lm-eval's `hf` model on a 2-question multiple-choice task from a local JSON file (no download);
    each log-likelihood it reports equals our model's on the same tokens."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    _, out = builtin_export
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in [
        {"question": "The function returns", "choices": ["the list", "xyzzy qq"], "answer": 0},
        {"question": "def read(path):", "choices": ["return", "zz zz"], "answer": 0}]))
    (tmp_path / "jetmoe_local.yaml").write_text(
        f"task: jetmoe_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32", tasks=["jetmoe_local"],
                                     task_manager=TaskManager(include_path=str(tmp_path)), device="cpu",
                                     batch_size=2, log_samples=True)
    assert 0.0 <= result["results"]["jetmoe_local"]["acc,none"] <= 1.0

    model = JetMoEForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(str(out / "tokenizer.json"), Path)
    samples = result["samples"]["jetmoe_local"]
    assert len(samples) == 2
    for sample in samples:
        for (context, continuation), [(theirs, _)] in zip(sample["arguments"], sample["resps"]):
            ctx = tok.encode(context)
            cont = tok.encode(context + continuation)[len(ctx):]  # lm-eval's split of the pair
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids[:, :-1]).logits.float(), -1)[0, len(ctx) - 1:]
            ours = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(ours - theirs) < 1e-3 * max(1.0, abs(ours)), (context, continuation, ours, theirs)


def test_export_argument_errors_are_one_line(builtin_export, tmp_path):
    step_folder, _ = builtin_export
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    cases = [
        ([str(step_folder), str(existing)], "is an existing file"),
        ([str(tmp_path / "missing"), str(tmp_path / "a")], "no such file or folder"),
        ([str(existing), str(tmp_path / "b")], "is a file, not a checkpoint folder"),
        ([str(tmp_path), str(tmp_path / "c")], "no committed checkpoint there"),
    ]
    for args, message in cases:
        proc = _run(str(ROOT / "train/export_hf.py"), *args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
        assert "checkpoint.resume" not in proc.stderr and "Traceback" not in proc.stderr
    assert existing.read_text() == "mine"
