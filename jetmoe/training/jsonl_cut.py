"""A resumed run drops the rows it will write again from metrics.jsonl and samples.jsonl, by cutting the file.

`cut_after_step(path, step)` keeps every row up to the last one whose step is <= `step` and removes what
follows (rows of later steps written before a crash, a torn last line) with one `ftruncate`, then fsyncs.
A kill at any moment leaves either the old file or the cut one: never less. (Reading the file whole and
writing it again in place, as before, emptied a 911 MB file when killed just after the truncation.)

The file is read backwards from its end, so a cut costs the rows it drops, not the file's size: a log of
300k steps is not parsed again at every restart. Rows are in step order (each resume cut the file before
appending), so the first row from the end with step <= `step` is the last one to keep.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

_BLOCK = 1 << 20


def row_step(line: bytes | str) -> float:
    """The row's step; inf for a line that is not a row (a torn write), so that it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _lines_backwards(f, size: int):
    """(offset, line) for each line of the open binary file, last first; a line keeps its newline."""
    pos, buf = size, b""
    while True:
        i = buf.rfind(b"\n", 0, max(len(buf) - 1, 0))
        if i >= 0:
            yield pos + i + 1, buf[i + 1:]
            buf = buf[:i + 1]
        elif pos > 0:
            read = min(_BLOCK, pos)
            pos -= read
            f.seek(pos)
            buf = f.read(read) + buf
        else:
            if buf:
                yield 0, buf
            return


def cut_after_step(path: str | Path, step: int) -> int:
    """Remove the rows after the last row of a step <= `step` (and a torn last line); returns bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        keep, newline = 0, False
        for offset, line in _lines_backwards(f, size):
            if row_step(line) <= step:
                keep, newline = offset + len(line), not line.endswith(b"\n")
                break
        if keep < size:
            os.ftruncate(f.fileno(), keep)
        if newline:  # a whole row that lost only its newline: the next row must not join it
            f.seek(keep)
            f.write(b"\n")
        if keep < size or newline:
            f.flush()
            os.fsync(f.fileno())
    return size - keep
