"""`data=mixture` for the trainer: open the sharded cache, sample per step by phase weights, load per rank.

Trainer-facing API (beyond what `Data` has):
  - `MixtureLoader.tokens_by_source() -> {name: tokens}`: cumulative training tokens per source after the
    steps done (a function of the step alone, so it is the same on every rank and after a resume);
  - `MixtureLoader.epochs_by_source() -> {name: completed passes}`;
  - `MixtureData.eval_loaders_by_source(G, micro, dp_rank, dp, max_steps) -> {name: EvalLoader}`, for
    `eval_loss_by_source`; `MixtureData.eval_loader(...)` interleaves all sources equally for `eval_loss`.
"""

from __future__ import annotations

import mmap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from jetmoe.data.loader import EvalLoader, check_layout, continue_hint, to_micro_batches
from jetmoe.data.mixture_config import WEIGHT_SCALE, MixtureSpec
from jetmoe.data.mixture_schedule import MixtureSampler
from jetmoe.data.shard_check import check_window_ids
from jetmoe.errors import JetMoEError, ResumeMismatch


class SourceWindows:
    """Windows of seq_len + 1 tokens inside the shards of one source (a window never crosses a shard).

    Window g of the source is the g-th in shard order; `index` maps this view's sample ids to window
    numbers (train and valid interleave: every k-th window is held out). Shards are memory-mapped on
    first use, so opening costs nothing per shard and resident memory stays what the batches touch.
    """

    def __init__(self, paths: list[Path], sizes: list[int], dtype: np.dtype, seq_len: int, eos_token_id: int,
                 length: int, index: Callable[[np.ndarray], np.ndarray], vocab_size: Optional[int] = None):
        self.paths, self.sizes, self.dtype = paths, sizes, dtype
        self.vocab_size = vocab_size  # the model's; a window holding a larger id is refused (shard_check)
        self.seq_len, self.eos_token_id = seq_len, eos_token_id
        per_shard = np.maximum((np.asarray(sizes, dtype=np.int64) - 1) // seq_len, 0)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])  # first window of each shard
        self.length, self.index = length, index
        self._maps: dict[int, np.ndarray] = {}

    @property
    def total_windows(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return self.length

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            with open(self.paths[shard], "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mm, "madvise"):  # windows are read at random: no readahead, no fault-around
                mm.madvise(mmap.MADV_RANDOM)
            self._maps[shard] = np.frombuffer(mm, dtype=self.dtype, count=self.sizes[shard])
        return self._maps[shard]

    def windows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.length):
            raise IndexError(f"sample id out of range [0, {self.length})")
        g = self.index(ids)
        shards = np.searchsorted(self.starts, g, side="right") - 1
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for row, (shard, w) in enumerate(zip(shards, g - self.starts[shards])):
            start = int(w) * self.seq_len
            out[row] = self._map(int(shard))[start:start + self.seq_len + 1]
        check_window_ids(out, shards, self.paths, self.vocab_size)
        return out


def split_source(paths, sizes, dtype, seq_len, eos, valid_fraction,
                 vocab_size: Optional[int] = None) -> tuple[SourceWindows, Optional[SourceWindows]]:
    """As `packing.split_windows`: every k-th window (k = round(1/valid_fraction)) is held out."""
    probe = SourceWindows(paths, sizes, dtype, seq_len, eos, 0, lambda j: j)
    total = probe.total_windows
    if valid_fraction <= 0:
        return SourceWindows(paths, sizes, dtype, seq_len, eos, total, lambda j: j, vocab_size), None
    k = max(2, round(1 / valid_fraction))
    n_valid = total // k
    train = SourceWindows(paths, sizes, dtype, seq_len, eos, total - n_valid,
                          lambda j: (j // (k - 1)) * k + j % (k - 1), vocab_size)
    valid = (SourceWindows(paths, sizes, dtype, seq_len, eos, n_valid, lambda j: j * k + (k - 1), vocab_size)
             if n_valid else None)
    return train, valid


class InterleavedValid:
    """All sources' validation windows, round-robin (each source counts equally in `eval_loss`)."""

    def __init__(self, views: list[SourceWindows]):
        self.views = views
        self.eos_token_id = views[0].eos_token_id
        self.length = len(views) * max(len(v) for v in views)

    def __len__(self) -> int:
        return self.length

    def windows(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        s = len(self.views)
        out = np.empty((len(ids), self.views[0].seq_len + 1), dtype=np.int64)
        for row, j in enumerate(ids):
            view = self.views[int(j) % s]
            out[row] = view.windows([(int(j) // s) % len(view)])[0]
        return out


class MixtureLoader:
    """Endless iterator of steps (lists of micro-batch dicts) for one dp rank, like `RankLoader`.

    The global batch of step s is `sampler.batch(s)`, whatever the layout; rank r takes the contiguous
    slice [r*G/dp, (r+1)*G/dp). State: samples consumed, with the schedule's past checked on resume.
    """

    def __init__(self, views: list[SourceWindows], sampler: MixtureSampler, micro_batch_size: int, dp_rank: int,
                 dp_size: int, document_mask: bool, log: Optional[Callable[[str], None]] = None):
        self.global_batch_size = sampler.global_batch_size
        self.micro_steps = check_layout(self.global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.views, self.sampler = views, sampler
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        self.seq_len = views[0].seq_len
        self.eos_token_id = views[0].eos_token_id
        self.log = log
        self.consumed_samples = 0

    @property
    def step(self) -> int:
        return self.consumed_samples // self.global_batch_size

    def rank_samples(self, step: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        sources, ids = self.sampler.batch(self.step if step is None else step)
        per_rank = self.global_batch_size // self.dp_size
        sl = slice(self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank)
        return sources[sl], ids[sl]

    def rank_windows(self, step: Optional[int] = None) -> np.ndarray:
        sources, ids = self.rank_samples(step)
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        for i in np.unique(sources):
            sel = sources == i
            out[sel] = self.views[int(i)].windows(ids[sel])
        return out

    def next_step(self) -> list[dict]:
        windows = self.rank_windows()
        before = self.sampler.epochs(self.step)
        self.consumed_samples += self.global_batch_size
        if self.dp_rank == 0:
            for name, epoch in self.sampler.epochs(self.step).items():
                if epoch > before[name]:
                    msg = (f"data source {name!r} ran out of samples at step {self.step}: epoch {epoch + 1} "
                           f"starts (reshuffled); it has now been seen {epoch} time(s)")
                    self.log(f"warning: {msg}") if self.log else warnings.warn(msg, stacklevel=2)
        return to_micro_batches(windows, self.micro_batch_size, self.eos_token_id, self.document_mask)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    def tokens_by_source(self) -> dict[str, int]:
        counts = self.sampler.consumed_before(self.step)
        return {name: int(c) * self.seq_len for name, c in zip(self.sampler.names, counts)}

    def epochs_by_source(self) -> dict[str, int]:
        return self.sampler.epochs(self.step)

    def _schedule_past(self, step: int) -> list:
        names = self.sampler.names
        return [[p.start_step, {n: w for n, w in zip(names, p.weights) if w}]
                for p in self.sampler.spec.phases if p.start_step < step]

    def state_dict(self) -> dict:
        return {"kind": "mixture", "consumed_samples": self.consumed_samples, "seed": self.sampler.seed,
                "global_batch_size": self.global_batch_size,
                "num_samples": dict(zip(self.sampler.names, self.sampler.num_samples)),
                "phases": self._schedule_past(self.step)}

    def check_resume(self, state: dict) -> None:
        """Raise ResumeMismatch, naming the key, the checkpoint's value and this run's, when the checkpoint's data
        position cannot continue under this mixture: what decides the samples of the steps already done
        (seed, samples per step, the sources' sample counts, the phases begun) must be the same."""
        if state.get("kind") != "mixture":
            step = int(state["consumed_samples"]) // int(state.get("global_batch_size") or self.global_batch_size)
            raise ResumeMismatch(f"data: the checkpoint was trained on a single data source, this run uses "
                                 f"data=mixture; resume with its data config, {continue_hint(step)}")
        step = int(state["consumed_samples"]) // int(state["global_batch_size"])
        if state["seed"] != self.sampler.seed:
            raise ResumeMismatch(f"train.seed: the checkpoint's data order used {state['seed']}, this run has "
                                 f"{self.sampler.seed}; resume with train.seed={state['seed']}, {continue_hint(step)}")
        if state["global_batch_size"] != self.global_batch_size:
            raise ResumeMismatch(f"train.global_batch_size: the checkpoint's mixture drew {state['global_batch_size']} "
                                 f"samples per step, this run {self.global_batch_size}; resume with "
                                 f"train.global_batch_size={state['global_batch_size']}, {continue_hint(step)}")
        mine = dict(zip(self.sampler.names, self.sampler.num_samples))
        if state["num_samples"] != mine:
            changed = sorted(n for n in set(mine) | set(state["num_samples"])
                             if mine.get(n) != state["num_samples"].get(n))
            raise ResumeMismatch(f"data.sources: the training samples of {changed} were "
                                 f"{[state['num_samples'].get(n) for n in changed]} in the checkpoint, "
                                 f"{[mine.get(n) for n in changed]} now; resume with the same sources, data.seq_len "
                                 f"and data.valid_fraction, {continue_hint(step)}")
        saved, now = [list(p) for p in state["phases"]], self._schedule_past(step)
        if saved != now:
            raise ResumeMismatch(f"data.phases: the weights of steps 1-{step} were {_readable(saved)} in the "
                                 f"checkpoint, {_readable(now)} now; only phases that start at or after step {step} "
                                 f"may change on resume: revert the others, {continue_hint(step)}")

    def load_state_dict(self, state: dict) -> None:
        self.check_resume(state)
        self.consumed_samples = int(state["consumed_samples"])

    def start_at_step(self, step: int) -> None:
        """checkpoint.data_changed=continue: this mixture from optimizer step `step` on (its phase, its position in
        every source's order, its tokens_by_source), as if it had been the data from the start."""
        self.consumed_samples = int(step) * self.global_batch_size


def _readable(phases: list) -> str:
    """[[start_step, {name: integer weight}]] as the config writes it: start_step and weights."""
    return str([{"start_step": start, "weights": {n: w / WEIGHT_SCALE for n, w in weights.items()}}
                for start, weights in phases])


@dataclass
class MixtureData:
    cfg: object  # DataConfig
    spec: MixtureSpec
    tokenizer: object
    train: list[SourceWindows]
    valid: list[Optional[SourceWindows]]
    seed: int
    stats: dict = field(default_factory=dict)
    log: Optional[Callable[[str], None]] = None

    @property
    def names(self) -> list[str]:
        return self.spec.names

    def sampler(self, global_batch_size: int) -> MixtureSampler:
        return MixtureSampler(self.spec, [len(v) for v in self.train], global_batch_size, self.seed)

    def train_loader(self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                     dp_size: int = 1, max_steps: Optional[int] = None) -> MixtureLoader:
        """`max_steps`: the run's length; a source with a weight too small to draw one sample by then is a
        warning (once, from data-parallel rank 0)."""
        sampler = self.sampler(global_batch_size)
        if max_steps and dp_rank == 0:
            for line in sampler.unsampled(max_steps):
                self.log(f"warning: {line}") if self.log else warnings.warn(line, stacklevel=2)
        return MixtureLoader(self.train, sampler, micro_batch_size, dp_rank, dp_size, self.cfg.document_mask, self.log)

    def eval_loaders_by_source(self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                               dp_size: int = 1, max_steps: Optional[int] = None) -> dict[str, EvalLoader]:
        return {name: EvalLoader(v, global_batch_size, micro_batch_size, dp_rank, dp_size, max_steps,
                                 self.cfg.document_mask)
                for name, v in zip(self.names, self.valid) if v is not None}

    def eval_loader(self, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                    max_steps: Optional[int] = None) -> Optional[EvalLoader]:
        views = [v for v in self.valid if v is not None]
        if not views:
            return None
        return EvalLoader(InterleavedValid(views), global_batch_size, micro_batch_size, dp_rank, dp_size, max_steps,
                          self.cfg.document_mask)
