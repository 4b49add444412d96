"""Your own config files, in every entry point: a folder with data/ and experiment/ files, brought in with
--config-dir (-cd) or hydra.searchpath, reaches train/pretrain.py, train/pretokenize.py, train/plan.py and
train/export_hf.py alike; mixtures take any source names from the command line, a data file or an experiment file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.ckpt_tiny import make_run, tiny_config, train_steps
from helpers.data_corpus import synthetic_docs, tokenizer_file, write_jsonl
from helpers.launch_util import TINY_RUN

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import TrainingState, save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))

import export_hf as export_cli  # noqa: E402
import plan as plan_cli  # noqa: E402
import pretokenize as pretokenize_cli  # noqa: E402

SPELLINGS = ["--config-dir", "-cd", "hydra.searchpath"]


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    """A user's config folder: data/mydata.yaml (local files, their own tokenizer), data/mymix.yaml and
    experiment/mine.yaml (mixtures whose sources are named wiki and code_py, not the group's examples)."""
    root = tmp_path_factory.mktemp("user")
    tok = tokenizer_file(tmp_path_factory)
    write_jsonl(root / "wiki.jsonl", synthetic_docs(120, seed=1))
    write_jsonl(root / "code.jsonl", synthetic_docs(80, seed=2), field="content")
    folder = root / "conf"
    (folder / "data").mkdir(parents=True)
    (folder / "experiment").mkdir()
    (folder / "data" / "mydata.yaml").write_text(
        f"defaults:\n  - files\n  - _self_\npath: {root / 'wiki.jsonl'}\ntokenizer: {tok}\n")
    (folder / "data" / "mymix.yaml").write_text(
        f"defaults:\n  - mixture\n  - _self_\ntokenizer: {tok}\nsources:\n  wiki: {{path: {root / 'wiki.jsonl'}}}\n"
        f"  code_py: {{path: {root / 'code.jsonl'}, text_field: content, weight: 3}}\n")
    (folder / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: mixture\n"
        f"data:\n  tokenizer: {tok}\n  seq_len: 16\n  shard_tokens: 1500\n  num_proc: 1\n  valid_fraction: 0.1\n"
        f"  sources:\n    wiki: {{path: {root / 'wiki.jsonl'}, weight: 2}}\n"
        f"    code_py: {{path: {root / 'code.jsonl'}, text_field: content}}\n"
        "model:\n  vocab_size: 512\n  eos_token_id: 0\n  bos_token_id: null\n"
        "train:\n  global_batch_size: 32\n")
    (folder / "myrun.yaml").write_text("defaults:\n  - config\n  - _self_\ntrain:\n  global_batch_size: 48\n")
    return folder


def spelled(spelling: str, folder: Path) -> list[str]:
    if spelling == "hydra.searchpath":
        return [f"hydra.searchpath=[file://{folder}]"]
    return [spelling, str(folder)]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_plan_reads_your_experiment_and_data_files(conf, spelling, capsys):
    assert plan_cli.main([*spelled(spelling, conf), "+experiment=mine"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["tokens_per_step"] == 32 * 16  # the experiment's batch and its data's seq_len
    assert plan_cli.main([*spelled(spelling, conf), "data=mydata"]) == 0  # found in your folder
    assert plan_cli.main(["data=mydata"]) == 2 and "mydata" in capsys.readouterr().err  # and only there


@pytest.mark.parametrize("name", ["--config-name", "-cn"])
def test_a_primary_config_of_your_own(conf, name, capsys, run_config):
    assert plan_cli.main(["-cd", str(conf), name, "myrun"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens_per_step"] == 48 * 128
    assert run_config("--config-dir", str(conf), f"{name}=myrun").train.global_batch_size == 48
    with pytest.raises(JetMoEError, match="Cannot find primary config 'myrun'"):
        run_config(name, "myrun")  # not on the search path without the folder


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_pretokenize_fills_the_cache_your_files_describe(conf, spelling, tmp_path, capsys):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert pretokenize_cli.main([*spelled(spelling, conf), "+experiment=mine", cache]) == 0
    out = capsys.readouterr().out
    assert "cache complete" in out and "'code_py'" in out and "'wiki'" in out and "'web'" not in out
    assert pretokenize_cli.main([*spelled(spelling, conf), "data=mydata", "model.vocab_size=512",
                                 "model.eos_token_id=0", "model.bos_token_id=null", cache]) == 0
    assert "built now" in capsys.readouterr().out


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_pretrain_composes_your_mixture_with_its_own_source_names(conf, spelling):
    from jetmoe.training.cli import load_run

    _, config = load_run([*spelled(spelling, conf), "+experiment=mine"])
    assert sorted(config.data.sources) == ["code_py", "wiki"]  # no example sources merged in
    assert config.data.sources["wiki"]["weight"] == 2 and config.train.global_batch_size == 32
    _, config = load_run([*spelled(spelling, conf), "data=mymix", "model.eos_token_id=0"])
    assert sorted(config.data.sources) == ["code_py", "wiki"] and config.data.sources["code_py"]["weight"] == 3


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_export_takes_the_tokenizer_your_data_file_names(conf, spelling, tmp_path, tmp_path_factory):
    config = tiny_config(vocab_size=512)
    model, opt, sched, loader = make_run(config)
    train_steps(model, opt, sched, loader, 1)
    folder = save(tmp_path / "ckpt", 1, model, opt, TrainingState(step=1), model_config=config)
    out = tmp_path / "hf"
    assert export_cli.main([str(folder), str(out), *spelled(spelling, conf), "data=mydata", "--dtype", "fp32"]) == 0
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(tokenizer_file(tmp_path_factory).read_text())


def test_mixtures_take_any_source_names_from_the_command_line(run_config, tmp_path):
    a, b = (write_jsonl(tmp_path / f"{n}.jsonl", synthetic_docs(5)) for n in ("a", "b"))
    config = run_config("data=mixture", f"data.sources.wiki.path={a}", f"data.sources.code_py.path={b}",
                        "data.sources.code_py.weight=3")
    assert config.data.sources == {"wiki": {"path": str(a)}, "code_py": {"path": str(b), "weight": 3}}


def test_a_mixture_without_sources_is_one_line(run_config):
    with pytest.raises(JetMoEError, match=r"^data.sources is empty; data=mixture needs data.sources.<name>="):
        run_config("data=mixture")


def test_config_folder_mistakes_are_one_line(conf, tmp_path, run_config):
    with pytest.raises(JetMoEError, match="--config-dir .*nowhere is not a directory"):
        run_config("--config-dir", str(tmp_path / "nowhere"), "data=mydata")
    with pytest.raises(JetMoEError, match="bad override: .*mydata") as e:
        run_config("data=mydata")  # the folder not given: Hydra cannot find the file
    assert "\n" not in str(e.value)
    with pytest.raises(JetMoEError, match="needs a value"):
        run_config("--config-dir")
    assert plan_cli.main(["--bogus", "cluster.gpus=1"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["--config-dir", "hydra.searchpath"])
def test_pretokenize_then_pretrain_a_mixture_of_your_experiment_file(conf, spelling, tmp_path):
    """The issue's case end to end: your experiment file's own sources, pre-tokenized then trained, by the
    scripts themselves."""
    common = [*spelled(spelling, conf), "+experiment=mine", f"data.cache_dir={tmp_path / 'cache'}"]
    fill = subprocess.run([sys.executable, str(ROOT / "train/pretokenize.py"), *common], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert fill.returncode == 0 and "cache complete" in fill.stdout, fill.stderr[-2000:]
    run = subprocess.run([sys.executable, str(ROOT / "train/pretrain.py"), *common, *TINY_RUN,
                          "model.vocab_size=512", "train.global_batch_size=8", "train.max_steps=2",
                          f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and set(rows[-1]["tokens_by_source"]) == {"code_py", "wiki"}
