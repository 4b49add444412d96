"""Fill the sharded token cache of a mixture: many processes on one node, many nodes on one cache.

Task i of n (a Slurm job-array index, or one command per node) takes a fixed, disjoint share of the input
files: all files of all sources, largest first, each to the task with the fewest bytes so far. Inside a
task, `num_proc` worker processes each tokenize whole files (`shards.write_unit`). Every file is its own
resumable unit, so any task can be killed and re-run, and tasks never write the same directory.

Why not HF datatrove (DESIGN.md 3 asked to evaluate it first): its DocumentTokenizer writes one output
file per *task* (files[rank::world_size]), so the token files, hence the sample ids, depend on how many
tasks tokenized the corpus, which breaks our layout-independent order; it resumes per task (a killed
task redoes all its files) and keeps completion in its own logging dir rather than beside the shards;
its Slurm executor submits sbatch itself instead of being a job array one submits; and it adds a dozen
dependencies for what is here ~150 lines on top of the `datasets` readers the trainer already uses.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Optional

from jetmoe.data.shards import Unit, read_done, write_unit
from jetmoe.errors import JetMoEError


def assign(units: list[Unit], task_index: int, num_tasks: int) -> list[Unit]:
    """The units of task `task_index` of `num_tasks`: disjoint, together all, balanced by bytes."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise JetMoEError(f"task {task_index} of {num_tasks}: the task index must lie in [0, {num_tasks})")
    load = [0] * num_tasks
    mine = []
    for unit in sorted(units, key=lambda u: (-u.size_bytes, u.source, u.uid)):
        task = min(range(num_tasks), key=lambda t: (load[t], t))
        load[task] += max(unit.size_bytes, 1)
        if task == task_index:
            mine.append(unit)
    return mine


def _fmt_eta(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Tokens/s and an ETA from the bytes of finished files (their tokens-per-byte, applied to the rest)."""

    def __init__(self, units: list[Unit], log: Optional[Callable[[str], None]], every_s: float):
        self.total_units = len(units)
        self.total_bytes = sum(u.size_bytes for u in units)
        self.log, self.every_s = log, every_s
        self.start = self.last = time.perf_counter()
        self.tokens = self.documents = self.done_units = self.done_bytes = self.done_tokens = 0

    def add(self, tokens: int, documents: int) -> None:
        self.tokens += tokens
        self.documents += documents

    def unit_done(self, unit: Unit, done: dict) -> None:
        self.done_units += 1
        self.done_bytes += unit.size_bytes
        self.done_tokens += done["num_tokens"]

    def maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.log or (not force and now - self.last < self.every_s):
            return
        self.last = now
        rate = self.tokens / max(now - self.start, 1e-9)
        eta = None
        if self.done_bytes and rate > 0 and self.total_bytes:
            expected = self.done_tokens / self.done_bytes * self.total_bytes
            eta = max(0.0, expected - self.done_tokens) / rate
        self.log(f"pretokenize: {self.done_units}/{self.total_units} files, {self.tokens:,} tokens "
                 f"({self.documents:,} documents) this run, {rate:,.0f} tokens/s, ETA {_fmt_eta(eta)}")


_worker: dict = {}


def _init_worker(tokenizer, root, shard_tokens, hf_cache, q, started) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: num_proc says how many
    _worker.update(tokenizer=tokenizer, root=root, shard_tokens=shard_tokens, hf_cache=hf_cache, q=q, started=started)


def _run_unit(index: int, unit: Unit):
    w = _worker
    w["started"][index] = 1  # shared memory, written at once: a queue's message could die with the process
    done = write_unit(unit, w["tokenizer"], w["root"], w["shard_tokens"],
                      progress=lambda t, d: w["q"].put((t, d)), hf_cache=w["hf_cache"])
    return index, done


def _run_pool(units, tokenizer, root, shard_tokens, num_proc, hf_cache, progress, busy) -> None:
    """Whole files per worker process. concurrent.futures, not multiprocessing.Pool: when a worker dies
    (the OOM killer's SIGKILL), Pool quietly starts another and the lost file's result never comes, so
    the parent waited forever; ProcessPoolExecutor fails every pending future with BrokenProcessPool."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    started = ctx.Array("b", len(units), lock=False)  # started[i] = 1 once a worker has taken unit i

    def drain(timeout: float) -> None:  # at most `timeout` seconds, however busy the workers are
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return
            progress.add(*item)

    pool = ProcessPoolExecutor(min(num_proc, len(units)), mp_context=ctx, initializer=_init_worker,
                               initargs=(tokenizer, root, shard_tokens, hf_cache, q, started))
    try:
        pending = {pool.submit(_run_unit, i, u) for i, u in enumerate(units)}
        while pending:
            drain(0.2)
            done_now, pending = wait(pending, timeout=0, return_when=FIRST_COMPLETED)
            for future in done_now:
                try:
                    index, done = future.result()  # re-raises a worker's JetMoEError here
                except BrokenProcessPool:
                    raise _dead_worker(units, [i for i in range(len(units)) if started[i]], root) from None
                if done is None:
                    busy.append(units[index])
                else:
                    progress.unit_done(units[index], done)
            progress.maybe_print()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    drain(0.1)  # the workers have exited, so their last progress messages are in the pipe


def _dead_worker(units: list[Unit], started: list[int], root: Path) -> JetMoEError:
    """The files taken but not finished are where the dead worker was (one of them, with num_proc > 1)."""
    finished = sum(read_done(root / units[i].uid) is not None for i in started)
    names = [units[i].path for i in started if read_done(root / units[i].uid) is None] or ["(not known)"]
    return JetMoEError(
        f"a pre-tokenization worker process died (killed by a signal: the out-of-memory killer, or a time limit) "
        f"while tokenizing one of: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}; the {finished} files "
        f"finished in this run are kept: run the same command again to resume (with a lower data.num_proc if "
        f"memory ran out)")


def pretokenize_units(units: list[Unit], tokenizer, root: Path, shard_tokens: int, num_proc: int = 1,
                      log: Optional[Callable[[str], None]] = None, hf_cache: Optional[Path] = None,
                      progress_every_s: float = 10.0) -> dict:
    """Tokenize `units` into `root`; returns {tokens, documents, seconds, tokens_per_sec, skipped_busy}."""
    if shard_tokens < 1:
        raise JetMoEError(f"data.shard_tokens={shard_tokens} must be positive")
    progress = Progress(units, log, progress_every_s)
    busy = []
    if num_proc <= 1 or len(units) <= 1:
        for unit in units:
            done = write_unit(unit, tokenizer, root, shard_tokens, progress=progress.add, hf_cache=hf_cache)
            if done is None:
                busy.append(unit)
            else:
                progress.unit_done(unit, done)
            progress.maybe_print()
    else:
        _run_pool(units, tokenizer, root, shard_tokens, num_proc, hf_cache, progress, busy)
    seconds = time.perf_counter() - progress.start
    progress.maybe_print(force=True)
    return {"tokens": progress.tokens, "documents": progress.documents, "seconds": seconds,
            "tokens_per_sec": progress.tokens / max(seconds, 1e-9), "busy": [u.path for u in busy]}
