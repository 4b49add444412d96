"""Which source each sample of global step s comes from: a function of (config, seed, s) alone.

Within a phase, the sample slots 0, 1, 2, ... of the phase are dealt to the sources by Webster's divisor
method (Sainte-Lague): source i's k-th sample "arrives" at time (k + 1/2) / w_i and slots go to arrivals
in time order (ties: the source earlier by name). The first n slots then give source i round(w_i * n)
samples up to a tie, for every n: so a step of G samples holds within about one sample of w_i * G from
each source, and the cumulative count is never off by more than that either. The method is
house-monotone, so the count through n slots only grows with n, and it has a closed form: step s needs
two counts, each found by sorting the O(#sources) arrivals near slot n in exact integer arithmetic.

Each source keeps one endless stream of its own samples (epoch after epoch of a keyed permutation, as
`GlobalBatchSampler`): its position in that stream before step s is the sum of its counts over the phases
before s. The samples of one step are then shuffled by (seed, step) so that every data-parallel slice
sees the mixture, not one source.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np

from jetmoe.data.mixture_config import WEIGHT_SCALE, MixtureSpec
from jetmoe.data.sampler import GlobalBatchSampler
from jetmoe.errors import JetMoEError


def _arrivals_le(a: int, d: int, t: int) -> int:
    """Arrivals with time <= t of a source with integer weight a of total d: #{k >= 0: (2k+1) d <= 2 a t}."""
    return (2 * a * t // d + 1) // 2


def _arrivals_lt(a: int, d: int, t: int) -> int:
    """Arrivals with time < t: #{k >= 0: (2k+1) d < 2 a t}."""
    return ((2 * a * t - 1) // d + 1) // 2 if t > 0 else 0


def webster_counts(weights: tuple[int, ...], n: int) -> list[int]:
    """Samples per source among the first n slots (integer weights; zero weight gets nothing)."""
    d = sum(weights)
    s = len(weights)
    lo, hi = max(0, n - s - 1), n + s + 1  # the n-th arrival lies in [n - s/2, n + s/2]
    before = [_arrivals_lt(a, d, lo) if a else 0 for a in weights]
    candidates = []
    for i, a in enumerate(weights):
        if a:
            for k in range(before[i], _arrivals_le(a, d, hi)):
                candidates.append((Fraction(2 * k + 1, a), i))  # time x 2/d: the order is what matters
    candidates.sort()
    take = n - sum(before)
    if not 0 <= take <= len(candidates):  # cannot happen by the bound above; a guard, not a code path
        raise AssertionError(f"webster window missed slot {n}")
    counts = list(before)
    for _, i in candidates[:take]:
        counts[i] += 1
    return counts


def source_seed(seed: int, name: str) -> int:
    """Each source's order depends on the run seed and its own name only (adding a source keeps the others')."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


class MixtureSampler:
    """`batch(step)` -> (source index, sample id within the source) for the G samples of global step `step`."""

    def __init__(self, spec: MixtureSpec, num_samples: list[int], global_batch_size: int, seed: int):
        if global_batch_size < 1:
            raise JetMoEError(f"train.global_batch_size={global_batch_size} must be positive")
        self.spec = spec
        self.names = spec.names
        self.global_batch_size = global_batch_size
        self.seed = seed
        for name, n, used in zip(self.names, num_samples, self._used()):
            if n < 1 and used:
                raise JetMoEError(f"data source {name!r} holds no training sample of data.seq_len+1 tokens; "
                                  f"add data, lower data.seq_len or give it weight 0")
        self.num_samples = list(num_samples)
        self.streams = [GlobalBatchSampler(max(n, 1), 1, source_seed(seed, name))
                        for name, n in zip(self.names, num_samples)]
        # samples each source gets in each complete phase (the last phase never completes)
        self._phase_totals = []
        for p, nxt in zip(spec.phases, spec.phases[1:]):
            self._phase_totals.append(webster_counts(p.weights, (nxt.start_step - p.start_step) * global_batch_size))

    def unsampled(self, end_step: int) -> list[str]:
        """One line per (phase, source) with a positive weight that draws no sample before step `end_step`.

        Webster gives integer weight a of total d its first sample at slot n when 2 a n >= d, so over n
        slots the smallest weight that draws one is (d - a) / (2n - 1) of the others' total; one more
        integer step covers a tie lost to a source earlier by name."""
        lines = []
        G = self.global_batch_size
        for p, phase in enumerate(self.spec.phases):
            if phase.start_step >= end_step:
                break
            nxt = self.spec.phases[p + 1].start_step if p + 1 < len(self.spec.phases) else end_step
            n = (min(nxt, end_step) - phase.start_step) * G
            d = sum(phase.weights)
            for name, a, got in zip(self.names, phase.weights, webster_counts(phase.weights, n)):
                if a and not got:
                    smallest = -(-(d - a) // (2 * n - 1)) + 1
                    lines.append(f"data source {name!r} draws no sample in phase {p} (steps {phase.start_step + 1}-"
                                 f"{min(nxt, end_step)}, {n:,} samples): its weight {a / WEIGHT_SCALE:g} is below "
                                 f"{smallest / WEIGHT_SCALE:.3g}, the smallest that draws one with the other "
                                 f"weights of that phase; raise it, or give it 0")
        return lines

    def _used(self) -> list[bool]:
        return [any(p.weights[i] for p in self.spec.phases) for i in range(len(self.names))]

    def consumed_before(self, step: int) -> np.ndarray:
        """Samples drawn from each source by the first `step` steps (step = optimizer steps done)."""
        p = self.spec.phase_at(step)
        phase = self.spec.phases[p]
        total = np.array(webster_counts(phase.weights, (step - phase.start_step) * self.global_batch_size),
                         dtype=np.int64)
        for counts in self._phase_totals[:p]:
            total += np.asarray(counts, dtype=np.int64)
        return total

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.consumed_before(step), self.consumed_before(step + 1)
        sources, ids = [], []
        for i, (a, b) in enumerate(zip(start, end)):
            if b > a:
                sources.append(np.full(b - a, i, dtype=np.int64))
                ids.append(self.streams[i].stream(int(a), int(b - a)))
        sources, ids = np.concatenate(sources), np.concatenate(ids)
        order = np.random.default_rng([self.seed, step, 0x6D6978]).permutation(len(ids))
        return sources[order], ids[order]

    def epochs(self, step: int) -> dict[str, int]:
        """Completed passes over each source after `step` steps (0 until a source first runs out)."""
        used = self.consumed_before(step)
        return {n: int(u // max(s, 1)) for n, u, s in zip(self.names, used, self.num_samples)}
