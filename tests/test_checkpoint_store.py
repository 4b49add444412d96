"""Checkpoint storage on one process: format, exact resume, keep, damaged files, full disk, crashes."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import TrainingState, folders, read_into, read_latest, resolve, save, store, verify
from helpers.ckpt_tiny import make_run, tiny_config, train_steps


def _save(root, step, model, opt, sched, loader, keep=0, config=None, **kw):
    state = TrainingState(step=step, states={"scheduler": sched, "data": loader}, config={"note": "resolved config"})
    return save(root, step, model, opt, state, model_config=config or model.config, keep=keep, **kw)


def _trained(tmp_path, steps=2, keep=0):
    config = tiny_config()
    model, opt, sched, loader = make_run(config)
    folders = []
    for s in range(1, steps + 1):
        train_steps(model, opt, sched, loader, 1)
        folders.append(_save(tmp_path, s, model, opt, sched, loader, keep=keep))
    return model, folders


def test_resumed_losses_equal_uninterrupted_run(tmp_path):
    config = tiny_config()
    full = train_steps(*make_run(config), 6)

    model, opt, sched, loader = make_run(config)
    first = train_steps(model, opt, sched, loader, 3)
    folder = _save(tmp_path, 3, model, opt, sched, loader, shard_bytes=20_000)  # many small files
    assert len(list(folder.glob("model-pp00*.safetensors"))) > 3
    assert len(list(folder.glob("optimizer/exp_avg_sq-pp00*.safetensors"))) > 3

    model, opt, sched, loader = make_run(config, seed=1)  # different init: everything must come from disk
    loader.seed = 0
    folder = resolve("auto", tmp_path)
    state = TrainingState(states={"scheduler": sched, "data": loader})
    read_into(folder, model, opt, state)
    assert state.step == 3
    assert first + train_steps(model, opt, sched, loader, 3) == full


def test_folder_layout_manifest_and_pointer(tmp_path):
    _, (_, folder) = _trained(tmp_path)
    assert read_latest(tmp_path) == folder.name == "step_00000002"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, meta in manifest["files"].items():
        assert (folder / name).stat().st_size == meta["size"]
        assert folders.sha256_file(folder / name) == meta["sha256"]
    assert {"config.json", "model.safetensors.index.json", "trainer_state.json",
            "optimizer/exp_avg-pp00.safetensors", "optimizer/exp_avg_sq-pp00.safetensors"} <= on_disk
    assert verify(folder) == []


def test_model_part_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = tiny_config()
    model, opt, sched, loader = make_run(config)
    train_steps(model, opt, sched, loader, 1)
    folder = _save(tmp_path, 1, model, opt, sched, loader, shard_bytes=50_000)  # several weight files + index
    assert len(list(folder.glob("model-pp00*.safetensors"))) > 1
    hf = transformers.JetMoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_keep_newest(tmp_path):
    _trained(tmp_path, steps=4, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_named_and_auto_falls_back(tmp_path, damage):
    _trained(tmp_path, steps=2)
    bad = tmp_path / "step_00000002" / "model-pp00.safetensors"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    said = []
    assert resolve("auto", tmp_path, log=said.append) == tmp_path / "step_00000001"
    assert len(said) == 1 and "model-pp00.safetensors" in said[0] and "falling back to step_00000001" in said[0]
    with pytest.raises(JetMoEError, match="model-pp00.safetensors"):
        resolve(str(tmp_path / "step_00000002"), tmp_path)


def test_resolve_none_and_empty(tmp_path):
    assert resolve("none", tmp_path) is None
    assert resolve("auto", tmp_path / "nothing-here") is None
    with pytest.raises(JetMoEError, match="no such folder"):
        resolve(str(tmp_path / "missing"), tmp_path)


def _fail_on(monkeypatch, predicate, exc):
    real = store.write_bytes

    def writer(path, data, **kw):
        if predicate(Path(path)):
            with open(path, "wb") as f:  # part of the file reaches the disk, as with a real full disk
                f.write(bytes(memoryview(data)[: len(data) // 3]))
            raise exc
        real(path, data, **kw)

    monkeypatch.setattr(store, "write_bytes", writer)


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_disk_full_is_reported_and_previous_checkpoint_survives(tmp_path, monkeypatch):
    config = tiny_config()
    model, opt, sched, loader = make_run(config)
    train_steps(model, opt, sched, loader, 1)
    first = _save(tmp_path, 1, model, opt, sched, loader, keep=1)
    before = _snapshot(first)
    train_steps(model, opt, sched, loader, 1)
    _fail_on(monkeypatch, lambda p: "exp_avg_sq" in p.name, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(JetMoEError) as err:
        _save(tmp_path, 2, model, opt, sched, loader, keep=1)
    message = str(err.value)
    assert "disk is full" in message and "exp_avg_sq-pp00.safetensors" in message and "step_00000001" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001"]
    assert read_latest(tmp_path) == "step_00000001" and _snapshot(first) == before and verify(first) == []


class Crash(BaseException):
    """Stands for the process dying: nothing below catches it."""


@pytest.mark.parametrize("where", ["tensor file", "manifest", "pointer"])
def test_crash_mid_save_leaves_previous_checkpoint_and_latest(tmp_path, monkeypatch, where):
    config = tiny_config()
    model, opt, sched, loader = make_run(config)
    train_steps(model, opt, sched, loader, 1)
    first = _save(tmp_path, 1, model, opt, sched, loader)
    before = _snapshot(first)
    train_steps(model, opt, sched, loader, 1)
    hit = {"tensor file": lambda p: p.name.startswith("model-"),
           "manifest": lambda p: "manifest" in p.name,
           "pointer": lambda p: "latest" in p.name}[where]
    _fail_on(monkeypatch, hit, Crash())
    with pytest.raises(Crash):
        _save(tmp_path, 2, model, opt, sched, loader)
    monkeypatch.undo()
    assert _snapshot(first) == before
    if where == "pointer":  # step 2 was complete (renamed into place) before the pointer moved
        assert read_latest(tmp_path) == "step_00000001"
        assert resolve("auto", tmp_path) == tmp_path / "step_00000002"
    else:
        assert read_latest(tmp_path) == "step_00000001"
        assert resolve("auto", tmp_path) == first
        assert not (tmp_path / "step_00000002").exists()
    # the next save cleans up what the crash left
    _save(tmp_path, 3, model, opt, sched, loader)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert read_latest(tmp_path) == "step_00000003"


def _as_format_1(folder):
    """Rewrite a checkpoint folder as format 1 wrote it: whole optimizer tensors in one file per key (index:
    {key: {name: file}}), a manifest with whole-file hashes and no block hashes."""
    from safetensors.torch import load_file, save_file

    from jetmoe.training.checkpoint.parts import PartReader

    reader = PartReader(folder)
    index = reader.json("optimizer/index.json")
    old_index = {}
    for key, per_name in index.items():
        whole = {n: reader.flat(s["parts"], n, 0, torch.Size(s["shape"]).numel()).reshape(s["shape"]).clone()
                 for n, s in per_name.items()}
        for file in {p[0] for s in per_name.values() for p in s["parts"]}:
            (folder / file).unlink()
        save_file(whole, str(folder / f"optimizer/{key}-pp00.safetensors"))
        old_index[key] = {n: f"optimizer/{key}-pp00.safetensors" for n in whole}
    (folder / "optimizer/index.json").write_text(json.dumps(old_index))
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json"}
    manifest = {"format": folders.FORMAT, "version": 1, "step": reader.manifest["step"],
                "files": {n: {"size": p.stat().st_size, "sha256": folders.sha256_file(p)} for n, p in files.items()}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    folders._KNOWN.clear()


def test_format_1_checkpoint_resumes_exactly_and_is_verified(tmp_path):
    config = tiny_config()
    full = train_steps(*make_run(config), 5)
    model, opt, sched, loader = make_run(config)
    first = train_steps(model, opt, sched, loader, 2)
    folder = _save(tmp_path, 2, model, opt, sched, loader)
    _as_format_1(folder)
    assert verify(folder) == []

    model, opt, sched, loader = make_run(config, seed=1)
    loader.seed = 0
    state = TrainingState(states={"scheduler": sched, "data": loader})
    read_into(folder, model, opt, state)
    assert state.step == 2 and first + train_steps(model, opt, sched, loader, 3) == full

    exp_avg = folder / "optimizer/exp_avg-pp00.safetensors"
    data = bytearray(exp_avg.read_bytes())
    data[-1] ^= 0xFF
    exp_avg.write_bytes(bytes(data))
    with pytest.raises(JetMoEError, match="exp_avg-pp00.safetensors is altered"):
        read_into(folder, *make_run(config)[:2], TrainingState())


def test_newer_format_is_refused_with_the_fix(tmp_path):
    _, (_, folder) = _trained(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = folders.VERSION + 1
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(JetMoEError, match="newer jetmoe.*upgrade jetmoe"):
        read_into(folder, *make_run(tiny_config())[:2], TrainingState())


class _Counters:
    """A named state, as the trainer and the engine adapter are."""

    def __init__(self, **values):
        self.values = dict(values)

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values = {k: state[k] for k in self.values if k in state}


def test_named_states_round_trip_and_older_checkpoints_load_them_from_extra(tmp_path):
    config = tiny_config()
    model, opt, sched, loader = make_run(config)
    train_steps(model, opt, sched, loader, 2)
    trainer, engine = _Counters(step=2, skipped_total=1), _Counters(global_steps=2, global_samples=16, skipped_steps=1)
    state = TrainingState(step=2, states={"scheduler": sched, "data": loader, "trainer": trainer, "engine": engine})
    folder = save(tmp_path, 2, model, opt, state, model_config=config)
    saved = json.loads((folder / "trainer_state.json").read_text())
    assert saved["trainer"] == trainer.values and saved["engine"] == engine.values  # each under its own name

    def restored():
        fresh = {"trainer": _Counters(step=0, skipped_total=0),
                 "engine": _Counters(global_steps=0, global_samples=0, skipped_steps=0)}
        read_into(folder, *make_run(config)[:2], TrainingState(states=fresh))
        return {name: obj.values for name, obj in fresh.items()}

    assert restored() == {"trainer": trainer.values, "engine": engine.values}
    # as checkpoints before the registry wrote them: the counters flat in `extra`, the step beside them
    legacy = {k: v for k, v in saved.items() if k not in ("trainer", "engine")}
    legacy["extra"] = {"skipped_total": 1, **engine.values}
    path = folder / "trainer_state.json"
    path.write_text(json.dumps(legacy))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["trainer_state.json"] = {"size": path.stat().st_size, "sha256": folders.sha256_file(path)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    folders._KNOWN.clear()
    assert restored() == {"trainer": trainer.values, "engine": engine.values}
    with pytest.raises(ValueError, match="trainer_state.json's own keys"):
        TrainingState(states={"step": trainer})
