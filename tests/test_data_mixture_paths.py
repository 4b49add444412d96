"""A mixture source path that does not exist is a missing file, said at once, unless it reads as owner/name."""

import time

import pytest

from jetmoe.data.mixture_config import SourceSpec
from jetmoe.data.shards import plan_units
from jetmoe.errors import JetMoEError


@pytest.fixture
def no_hub(monkeypatch):
    import datasets

    def lookup(*args, **kwargs):
        raise AssertionError("a hub lookup was attempted")

    monkeypatch.setattr(datasets, "load_dataset", lookup)


@pytest.mark.parametrize("path", ["code0.jsonl", "code0", "data/code0.jsonl", "data/code0.jsonl.zst"])
def test_a_missing_relative_file_is_named_before_any_hub_lookup(path, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(JetMoEError) as err:
        plan_units(SourceSpec("code", path))
    message = str(err.value)
    assert message.startswith(f"data.sources.code.path={path}: no such file or directory {tmp_path / path}")
    assert "\n" not in message and time.monotonic() - start < 5


def test_an_owner_slash_name_is_still_a_hub_dataset_and_an_existing_file_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (hub,) = plan_units(SourceSpec("web", "HuggingFaceFW/fineweb"))
    assert hub.fmt is None and hub.path == "HuggingFaceFW/fineweb"
    (tmp_path / "code0.jsonl").write_text('{"text": "x"}\n')
    (local,) = plan_units(SourceSpec("code", "code0.jsonl"))
    assert local.fmt == "json" and local.path == str(tmp_path / "code0.jsonl")
