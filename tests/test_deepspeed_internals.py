"""Private DeepSpeed names live in one module, and the installed DeepSpeed still has each of them."""

import re
from importlib.metadata import version
from pathlib import Path

from packaging.specifiers import SpecifierSet

from jetmoe.parallel import deepspeed_internals
from jetmoe.parallel.deepspeed_internals import PRIVATE_NAMES, TESTED_RANGE, missing_private_names

ROOT = Path(__file__).resolve().parents[1]


def test_every_private_name_exists_in_the_installed_deepspeed():
    missing = missing_private_names()
    assert not missing, (f"DeepSpeed {version('deepspeed')} lacks {missing}: jetmoe was checked on deepspeed"
                         f"{TESTED_RANGE}; pin that range or port jetmoe/parallel/deepspeed_internals.py")


def test_the_check_reports_a_name_that_moved(monkeypatch):
    monkeypatch.setattr(deepspeed_internals, "PRIVATE_NAMES",
                        PRIVATE_NAMES + (("deepspeed.runtime.engine", "DeepSpeedEngine", "_no_such_name"),))
    assert missing_private_names() == ["deepspeed.runtime.engine.DeepSpeedEngine._no_such_name"]


def test_installed_deepspeed_is_in_the_pinned_range():
    pin = next(line for line in (ROOT / "pyproject.toml").read_text().splitlines() if '"deepspeed' in line)
    pinned = SpecifierSet(re.search(r'"deepspeed([^"]+)"', pin).group(1))
    assert pinned == SpecifierSet(TESTED_RANGE), "pyproject.toml's pin and TESTED_RANGE must agree"
    assert version("deepspeed") in pinned


def test_no_other_module_touches_a_private_deepspeed_name():
    offenders = []
    for path in (ROOT / "jetmoe").rglob("*.py"):
        if path.name == "deepspeed_internals.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(groups|engine|zero|DeepSpeedEngine|PipelineModule)\._[a-z]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, offenders
