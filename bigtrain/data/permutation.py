"""A seeded permutation of [0, n) computed element by element, so no O(n) table is held.

A Feistel network over the smallest even number of bits that covers n is a bijection of that
power-of-two domain; "cycle walking" (re-applying it until the value falls below n) turns it into
a bijection of [0, n). Hundreds of millions of windows then cost no memory to shuffle.
"""

from __future__ import annotations

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64's finaliser of x ^ key: a fast, well-spread 64-bit hash."""
    x = x ^ key
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """perm(i) for i in [0, n): a bijection fixed by `seed` (a sequence of non-negative ints)."""

    def __init__(self, n: int, seed: list[int]) -> None:
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n = n
        self._half = max(1, ((n - 1).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = np.random.SeedSequence(seed).generate_state(ROUNDS, dtype=np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self._half)
        left, right = x >> half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._mask)
        return (left << half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        """perm of each element of `i` (int64 array with values in [0, n))."""
        out = self._encrypt(np.asarray(i, dtype=np.uint64))
        outside = out >= self.n
        while outside.any():
            out[outside] = self._encrypt(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)
