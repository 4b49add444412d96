"""Which samples make up global step s: a function of (seed, s) alone.

The sample stream is epoch after epoch of a permutation of all samples; global batch s is the stream's
slice [s*G, (s+1)*G). Each epoch's permutation is computed on the fly from (seed, epoch) with a keyed
Feistel network (cycle-walked onto [0, N)), so no permutation table is stored and any position of the
stream can be reached in O(G) work: resume and layout changes cost nothing.
"""

from __future__ import annotations

import numpy as np

from jetmoe.errors import JetMoEError

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key: a well-spread keyed round function on uint64 arrays."""
    z = x ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class EpochPermutation:
    """A bijection of [0, n) chosen by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(_ROUNDS, dtype=np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        y = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = y >= self.n
        while outside.any():  # cycle-walking: the domain is < 4n, so a few rounds on average
            y[outside] = self._feistel(y[outside])
            outside = y >= self.n
        return y.astype(np.int64)


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise JetMoEError("the training set holds no sample; add data or lower data.seq_len")
        if global_batch_size < 1:
            raise JetMoEError(f"train.global_batch_size={global_batch_size} must be positive")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self._perms: dict[int, EpochPermutation] = {}

    def _perm(self, epoch: int) -> EpochPermutation:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            self._perms[epoch] = EpochPermutation(self.num_samples, self.seed, epoch)
        return self._perms[epoch]

    def stream(self, start: int, count: int) -> np.ndarray:
        """Sample ids at positions [start, start+count) of the endless shuffled stream."""
        pos = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self.num_samples)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._perm(int(epoch))(offsets[sel])
        return out

    def indices(self, step: int) -> np.ndarray:
        """The sample ids of global batch `step`."""
        return self.stream(step * self.global_batch_size, self.global_batch_size)

    def epoch_of(self, consumed_samples: int) -> int:
        return consumed_samples // self.num_samples
