"""The console: one logger, `jetmoe`, that every module writes through (`logger = get_logger(__name__)`).

Lines are printed as they are written (no time or level prefix): info to stdout, warnings and errors to
stderr. Only global rank 0 prints, so a line means the same on one process or on 768; a line that every
rank must print (its own error, its own stack) passes `extra=EVERY_RANK`. While a progress bar is shown,
lines go through it (`set_progress_bar`), so they never cut the bar in half. After a logging configuration
of someone else's (Hydra's job logging), `reclaim()` puts the console back.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "jetmoe"
EVERY_RANK = {"every_rank": True}
_bar = None  # the tqdm bar on screen, if any


def current_rank() -> int:
    """The global rank: the process group's once it exists, else the launcher's RANK (0 without one)."""
    dist = sys.modules.get("torch.distributed")  # never imported just for this: tools without torch log too
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _Console(logging.Handler):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "every_rank", False) or current_rank() == 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout  # looked up now: tests swap them
            if _bar is not None:
                _bar.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()
        except Exception:  # a closed stream at interpreter exit must not raise inside logging
            self.handleError(record)


def _configure() -> logging.Logger:
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, _Console) for h in root.handlers):
        handler = _Console()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False  # Hydra's job logging formats the root logger's lines; ours stay plain
    return root


def reclaim() -> None:
    """The console as set here again, after someone else's logging configuration: Hydra's job logging (the
    `disabled` one that ranks other than 0 run with, or a user's) may disable every logger that exists."""
    _configure()
    for name, existing in logging.Logger.manager.loggerDict.items():
        if isinstance(existing, logging.Logger) and (name == ROOT or name.startswith(ROOT + ".")):
            existing.disabled = False


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger of a jetmoe module (`name` = its __name__) or of an entry script (any name: filed under jetmoe)."""
    _configure()
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


def set_progress_bar(bar) -> None:
    """Write every line through `bar` (tqdm's `write`, above the bar) until set back to None."""
    global _bar
    _bar = bar
