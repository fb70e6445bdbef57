"""The global sample order: a seeded pseudo-random permutation per epoch, computed, never stored.

Position p of the endless stream is sample `perm_{seed, e}(p mod N)` of epoch `e = p // N`, where N is
the number of samples of the split. `perm` is a Feistel network on the smallest even number of bits
that covers N, restricted to [0, N) by cycle walking: a bijection computed per index in O(1) time and
memory. So the order needs no index file (no startup cost, nothing cached per run, 182M Pile samples
would otherwise need 1.4 GB per process), is the same on every machine, rank and worker, and any
position can be looked up directly, which makes resuming at a sample exact.
"""

from __future__ import annotations

import numpy as np

MASK64 = (1 << 64) - 1
ROUNDS = 6


def splitmix64(x: int) -> int:
    """splitmix64's output function on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (multiplications wrap mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class EpochPermutation:
    """A pseudo-random permutation of [0, n), keyed by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"cannot permute {n} samples")
        self.n = n
        self.half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        key = splitmix64(splitmix64(seed & MASK64) ^ (epoch & MASK64))
        self.round_keys = []
        for _ in range(ROUNDS):
            key = splitmix64(key)
            self.round_keys.append(np.uint64(key))

    def __call__(self, index: np.ndarray) -> np.ndarray:
        """Permuted indices int64 [k] of int indices [k] in [0, n)."""
        out = self._encrypt(np.asarray(index, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.mask
        for key in self.round_keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right


class GlobalOrder:
    """Maps positions of the endless stream to (epoch, sample index) for a split of n samples."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n = n
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, EpochPermutation] = {}

    def samples(self, positions: np.ndarray) -> np.ndarray:
        """Sample indices int64 [k] at stream positions int64 [k]."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, within = np.divmod(positions, self.n)
        if not self.shuffle:
            return within
        out = np.empty_like(within)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self._permutation(int(epoch))(within[chosen])
        return out

    def _permutation(self, epoch: int) -> EpochPermutation:
        if epoch not in self._cache:
            self._cache = {epoch: EpochPermutation(self.n, self.seed, epoch)}
        return self._cache[epoch]
