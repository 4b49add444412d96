"""Reading parts of a checkpoint: flat ranges across fragment files, bytes counted, verify=full|size."""

from __future__ import annotations

import pytest
import torch

from jetmoe.errors import JetMoEError
from jetmoe.training.checkpoint import TrainingState, folders, save
from jetmoe.training.checkpoint.parts import PartReader
from jetmoe.training.checkpoint.store import CheckpointWriter
from helpers.ckpt_tiny import make_run, tiny_config, train_steps


@pytest.fixture
def fragments(tmp_path):
    """One tensor split into two fragment files, as two ZeRO-1 ranks would write it."""
    whole = torch.arange(400_000, dtype=torch.float32)
    writer = CheckpointWriter(tmp_path, 1)
    writer.write_tensors("a.safetensors", {"w": whole[:150_000]}, parts={"w": [0, 150_000, [400_000]]})
    writer.write_tensors("b.safetensors", {"w": whole[150_000:]}, parts={"w": [150_000, 250_000, [400_000]]})
    folder = writer.commit()
    return folder, whole, [["a.safetensors", 0, 150_000], ["b.safetensors", 150_000, 250_000]]


@pytest.mark.parametrize("verify", ["full", "size"])
def test_any_range_is_assembled_and_only_its_bytes_are_read(fragments, verify):
    folder, whole, parts = fragments
    reader = PartReader(folder, verify)
    got = reader.flat(parts, "w", 149_000, 151_000)  # across the two files
    assert torch.equal(got, whole[149_000:151_000])
    full_size = sum(m["size"] for m in reader.manifest["files"].values())
    # size: headers + exactly the range; full: the verified blocks around it (a fraction of the files)
    assert reader.bytes_read < (0.2 if verify == "full" else 0.06) * full_size
    assert torch.equal(reader.flat(parts, "w", 0, 400_000), whole)
    with pytest.raises(JetMoEError, match="do not cover"):
        reader.flat(parts[:1], "w", 0, 200_000)


def test_full_catches_an_altered_byte_size_catches_truncation(fragments):
    folder, _, parts = fragments
    path = folder / "b.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    assert torch.equal(PartReader(folder, "size").flat(parts, "w", 0, 100), torch.arange(100.0))  # untouched range
    PartReader(folder, "size").flat(parts, "w", 399_990, 400_000)  # size cannot see a flipped bit
    with pytest.raises(JetMoEError, match="b.safetensors is altered"):
        PartReader(folder, "full").flat(parts, "w", 399_990, 400_000)
    path.write_bytes(bytes(data[:-100]))
    for verify in ("full", "size"):
        with pytest.raises(JetMoEError, match="b.safetensors is truncated"):
            PartReader(folder, verify).flat(parts, "w", 0, 400_000)


def test_manifest_has_block_hashes_of_what_was_written(tmp_path):
    model, opt, sched, loader = make_run(tiny_config())
    train_steps(model, opt, sched, loader, 1)
    folder = save(tmp_path, 1, model, opt, TrainingState(step=1), model_config=model.config)
    manifest = folders.load_manifest(folder)
    for name, meta in manifest["files"].items():
        data = (folder / name).read_bytes()
        block = meta["block"]
        assert len(meta["blocks"]) == -(-len(data) // block)
        assert meta["blocks"][-1] == __import__("hashlib").sha256(data[(len(meta["blocks"]) - 1) * block:]).hexdigest()


def test_keep_every_keeps_milestones_forever(tmp_path):
    model, opt, sched, loader = make_run(tiny_config())
    for step in range(1, 7):
        save(tmp_path, step, model, opt, TrainingState(step=step), keep=2, keep_every=3)
    assert [p.name for p in folders.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000005", "step_00000003"]


def test_a_commit_leaves_unverified_old_checkpoints_to_the_background_verifier(tmp_path):
    """After a restart, the checkpoints of earlier launches are unknown to this process. A trainer's commit
    (unknown="skip") neither reads nor deletes them; once verify_in_background has checked them, the next
    prune keeps the newest `keep` and never a damaged one."""
    model, opt, sched, loader = make_run(tiny_config())
    for step in range(1, 4):
        save(tmp_path, step, model, opt, TrainingState(step=step))
    damaged = tmp_path / "step_00000003" / "trainer_state.json"
    damaged.write_text(damaged.read_text().replace('"step": 3', '"step": 9'))  # same size, other bytes
    folders._KNOWN.clear()  # a new launch: it wrote none of them

    writer = CheckpointWriter(tmp_path, 4, launch="L2")
    writer.write_tensors("w.safetensors", {"w": torch.zeros(3)})
    writer.commit(keep=2, unknown="skip")
    assert [p.name for p in folders.list_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in (4, 3, 2, 1)]
    assert all(folders._KNOWN.get(p.resolve()) is None for p in folders.list_checkpoints(tmp_path)[1:])

    folders.verify_in_background(tmp_path).join()
    assert folders._KNOWN[(tmp_path / "step_00000003").resolve()] is False
    folders.prune(tmp_path, keep=2, unknown="skip")
    assert [p.name for p in folders.list_checkpoints(tmp_path)] == [f"step_{s:08d}" for s in (4, 3, 2)]
    assert not list(tmp_path.glob(".step_*"))  # the deleted folder went through a .pruned rename
