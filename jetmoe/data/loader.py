"""Per-rank loaders: each optimizer step, a data-parallel rank's slice of the global batch, in micro-batches."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from jetmoe.data.packing import PackedDataset
from jetmoe.data.sampler import GlobalBatchSampler
from jetmoe.errors import JetMoEError, ResumeMismatch


def micro_batches_per_step(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank (gradient accumulation steps): the one
    batch-size check, used by the loader, the trainer and the planner."""
    if global_batch_size < 1 or micro_batch_size < 1:
        raise JetMoEError(f"train.global_batch_size={global_batch_size} and train.micro_batch_size="
                          f"{micro_batch_size} must be >= 1")
    per_step = micro_batch_size * dp
    if global_batch_size % per_step:
        lower = max(per_step, global_batch_size // per_step * per_step)
        raise JetMoEError(
            f"train.global_batch_size={global_batch_size} is not a multiple of train.micro_batch_size="
            f"{micro_batch_size} x dp={dp} (= {per_step}); use e.g. train.global_batch_size={lower} or "
            f"{lower + per_step}, or another micro_batch_size")
    return global_batch_size // per_step


def check_layout(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> int:
    """Returns micro-batches per step (gradient accumulation steps)."""
    if not 0 <= dp_rank < dp_size:
        raise JetMoEError(f"dp rank {dp_rank} is outside [0, {dp_size})")
    return micro_batches_per_step(global_batch_size, micro_batch_size, dp_size)


def position_ids(inputs: np.ndarray, eos_token_id: int, document_mask: bool) -> np.ndarray:
    """arange per row; with document_mask, restart at 0 on the token after each EOS."""
    steps = np.arange(inputs.shape[1], dtype=np.int64)
    if not document_mask:
        return np.broadcast_to(steps, inputs.shape).copy()
    starts = np.zeros(inputs.shape, dtype=bool)
    starts[:, 0] = True
    starts[:, 1:] = inputs[:, :-1] == eos_token_id
    last_start = np.maximum.accumulate(np.where(starts, steps, 0), axis=1)
    return steps - last_start


def to_micro_batches(windows: np.ndarray, micro_batch_size: int, eos_token_id: int, document_mask: bool) -> list[dict]:
    import torch  # here, so tokenizing (pretokenize, cache builders) does not pay for importing torch

    inputs, labels = windows[:, :-1], windows[:, 1:]
    pos = position_ids(inputs, eos_token_id, document_mask)
    out = []
    for i in range(0, len(windows), micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        out.append({
            "input_ids": torch.from_numpy(np.ascontiguousarray(inputs[sl])),
            "labels": torch.from_numpy(np.ascontiguousarray(labels[sl])),
            "position_ids": torch.from_numpy(np.ascontiguousarray(pos[sl])),
        })
    return out


def continue_hint(step: int) -> str:
    """The override a data mismatch on resume names (README, the resume rules)."""
    return (f"or pass checkpoint.data_changed=continue to keep weights, optimizer and step and draw this data from "
            f"step {step} on")


class RankLoader:
    """Endless iterator of steps; each step is a list of micro-batch dicts for this dp rank.

    Rank r takes the contiguous slice [r*G/dp, (r+1)*G/dp) of the global batch; the global batch itself
    does not depend on the layout. State: samples consumed (so a resumed job may change dp or micro-batch).
    """

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, document_mask: bool = False):
        self.micro_steps = check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.dataset = dataset
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed)
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        self.consumed_samples = 0

    @property
    def step(self) -> int:
        return self.consumed_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return self.sampler.epoch_of(self.consumed_samples)

    def rank_sample_ids(self, consumed_samples: Optional[int] = None) -> np.ndarray:
        start = self.consumed_samples if consumed_samples is None else consumed_samples
        ids = self.sampler.stream(start, self.global_batch_size)
        per_rank = self.global_batch_size // self.dp_size
        return ids[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def next_step(self) -> list[dict]:
        windows = self.dataset.windows(self.rank_sample_ids())
        self.consumed_samples += self.global_batch_size
        return to_micro_batches(windows, self.micro_batch_size, self.dataset.eos_token_id, self.document_mask)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.sampler.seed,
                "num_samples": self.sampler.num_samples, "global_batch_size": self.global_batch_size}

    def check_resume(self, state: dict) -> None:
        """Raise ResumeMismatch when a checkpoint's data position cannot continue in this data's order."""
        step = int(state["consumed_samples"]) // int(state.get("global_batch_size") or self.global_batch_size)
        if state.get("kind") == "mixture":
            raise ResumeMismatch(f"data: the checkpoint was trained on a mixture (data=mixture), this run has one "
                                 f"source; resume with its data config, {continue_hint(step)}")
        if state["seed"] != self.sampler.seed:
            raise ResumeMismatch(f"train.seed: the checkpoint's data order used {state['seed']}, this run has "
                                 f"{self.sampler.seed}; resume with train.seed={state['seed']}, {continue_hint(step)}")
        if state["num_samples"] != self.sampler.num_samples:
            raise ResumeMismatch(f"data: the checkpoint was trained on {state['num_samples']} samples, this data has "
                                 f"{self.sampler.num_samples}; resume with the same data and data.seq_len, "
                                 f"{continue_hint(step)}")

    def load_state_dict(self, state: dict) -> None:
        self.check_resume(state)
        self.consumed_samples = int(state["consumed_samples"])

    def start_at_step(self, step: int) -> None:
        """checkpoint.data_changed=continue: this data's order from the position of optimizer step `step`."""
        self.consumed_samples = int(step) * self.global_batch_size

    def tokens_by_source(self) -> None:
        """One source: nothing beside the row's `tokens` (data=mixture counts tokens per source)."""
        return None


class EvalLoader:
    """The validation windows in fixed order, as steps of the same shape as training steps (finite)."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, max_steps: Optional[int] = None, document_mask: bool = False):
        check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.document_mask = document_mask
        steps = max(1, len(dataset) // global_batch_size)  # a set smaller than one batch is cycled once
        self.num_steps = steps if max_steps is None else min(steps, max_steps)

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[dict]]:
        per_rank = self.global_batch_size // self.dp_size
        for step in range(self.num_steps):
            start = step * self.global_batch_size + self.dp_rank * per_rank
            ids = np.arange(start, start + per_rank) % len(self.dataset)
            windows = self.dataset.windows(ids)
            yield to_micro_batches(windows, self.micro_batch_size, self.dataset.eos_token_id, self.document_mask)
