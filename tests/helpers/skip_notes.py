"""pytest plugin (`-p tests.helpers.skip_notes`, used by .ci/test.sh): writes one line to $JETMOE_TEST_NOTES
counting the Slurm tests that were skipped and why, so that `make test` can repeat it as its last line."""

import os
from pathlib import Path

_skipped: dict[str, int] = {}


def pytest_runtest_logreport(report):
    if report.skipped and "slurm" in report.keywords:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _skipped[reason] = _skipped.get(reason, 0) + 1


def pytest_sessionfinish(session):
    path = os.environ.get("JETMOE_TEST_NOTES")
    if path and _skipped:
        total = sum(_skipped.values())
        why = "; ".join(_skipped)
        Path(path).write_text(f"{total} Slurm test{'s' if total > 1 else ''} skipped: {why}\n")
