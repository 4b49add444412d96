"""Profiling a run: `train.profile_steps=[a, b]` records optimizer steps a..b (inclusive) with torch.profiler,
one trace per rank in `<run dir>/profile/rank<r>.pt.trace.json` (Chrome trace JSON: open it in Perfetto,
chrome://tracing or TensorBoard's PyTorch profiler plugin with `--logdir <run dir>/profile`).

On CUDA the same steps also record the allocator's history (torch.cuda.memory's recorder), dumped to
`profile/memory_rank<r>.pickle` (drag it onto https://pytorch.org/memory_viz). A CUDA out-of-memory error in
any step dumps a snapshot, `profile/oom_rank<r>_step<s>.pickle`, and the error names that file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from jetmoe.errors import JetMoEError

HISTORY_ENTRIES = 100_000  # allocation events kept by the recorder (the newest ones)


def profile_window(steps) -> tuple[int, int] | None:
    """(first, last) optimizer step to profile, or None for `train.profile_steps=[]`."""
    steps = list(steps or [])
    if not steps:
        return None
    if len(steps) != 2 or not all(isinstance(s, int) for s in steps) or not 1 <= steps[0] <= steps[1]:
        raise JetMoEError(f"train.profile_steps={steps} is not a range of steps; give [first, last] with "
                          "1 <= first <= last, e.g. train.profile_steps=[5,7]")
    return steps[0], steps[1]


class CudaMemory:
    """The CUDA caching allocator's recorder and snapshots. `dump` is torch's snapshot writer; another callable
    taking a path stands in for it where no CUDA device is present."""

    def __init__(self, dump: Callable[[str], None] | None = None, record: Callable[..., None] | None = None):
        self._dump = dump or torch.cuda.memory._dump_snapshot
        self._record = record or torch.cuda.memory._record_memory_history

    def start(self) -> None:
        self._record(enabled="all", max_entries=HISTORY_ENTRIES)

    def stop(self) -> None:
        self._record(enabled=None)

    def dump(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._dump(str(path))
        return path


class StepProfiler:
    """Wrap each optimizer step in `with profiler.step(s):`; it starts, stops and writes as the window says,
    and turns a CUDA out-of-memory error into one that names the snapshot it dumped."""

    def __init__(self, run_dir: Path, rank: int, window: tuple[int, int] | None, memory: CudaMemory | None):
        self.folder = Path(run_dir) / "profile"
        self.rank = rank
        self.window = window
        self.memory = memory  # None off CUDA
        self.profiler = None

    @classmethod
    def from_train(cls, train, run_dir: Path, rank: int, cuda: bool) -> "StepProfiler":
        """For `train.profile_steps` (the `train` section's)."""
        return cls(run_dir, rank, profile_window(train.profile_steps), CudaMemory() if cuda else None)

    @contextlib.contextmanager
    def step(self, step: int):
        if self.window and step == self.window[0]:
            self._start()
        label = torch.profiler.record_function(f"step {step}") if self.profiler is not None else contextlib.nullcontext()
        try:
            with label:  # each step is one named span in the trace
                yield
        except torch.cuda.OutOfMemoryError as e:
            raise self._out_of_memory(step, e) from e
        if self.window and step == self.window[1] and self.profiler is not None:
            self._stop()

    def trace_path(self) -> Path:
        return self.folder / f"rank{self.rank}.pt.trace.json"

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=False)
        self.profiler.start()
        if self.memory is not None:
            self.memory.start()

    def _stop(self) -> None:
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.trace_path()))
        self.profiler = None
        if self.memory is not None:
            self.memory.dump(self.folder / f"memory_rank{self.rank}.pickle")
            self.memory.stop()

    def _out_of_memory(self, step: int, error: BaseException) -> JetMoEError:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        where = "no memory snapshot (not on CUDA)"
        if self.memory is not None:
            try:
                where = f"memory snapshot {self.memory.dump(self.folder / f'oom_rank{self.rank}_step{step}.pickle')}"
            except Exception as dump_error:  # the error itself matters more than its snapshot
                where = f"no memory snapshot ({type(dump_error).__name__}: {dump_error})"
        return JetMoEError(
            f"CUDA out of memory in step {step} on rank {self.rank} ({first_line}); {where} "
            "(view it at https://pytorch.org/memory_viz); lower train.micro_batch_size or turn on "
            "parallel.activation_checkpointing")

    def close(self) -> None:
        """A run that ends inside the window still writes what it recorded."""
        if self.profiler is not None:
            self._stop()
