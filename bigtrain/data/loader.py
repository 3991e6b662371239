"""Packed `seq_len + 1` token windows over memory-mapped shards, in a rank-free global order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bigtrain.data.shards import load_manifest, read_shard_tokens
from bigtrain.errors import BigtrainError


class PackedTokens:
    """All shards of a prepared dataset as one token stream, cut into overlapping windows.

    Window i is tokens [i*seq_len, (i+1)*seq_len + 1): inputs and next-token targets in one row.
    """

    def __init__(self, data_dir: Path | str, seq_len: int) -> None:
        if seq_len < 1:
            raise BigtrainError(f"seq_len must be positive, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.manifest = load_manifest(self.data_dir)
        self._shards: list[np.ndarray] = []
        for entry in self.manifest["shards"]:
            tokens = read_shard_tokens(self.data_dir / entry["file"])
            if len(tokens) != entry["tokens"]:
                raise BigtrainError(
                    f"shard {self.data_dir / entry['file']} holds {len(tokens)} tokens, "
                    f"manifest says {entry['tokens']} (run `bigtrain data verify`)"
                )
            self._shards.append(tokens)
        # _starts[k] is the stream position of shard k's first token; _starts[-1] is the total.
        self._starts = np.cumsum([0] + [len(t) for t in self._shards])
        self.total_tokens = int(self._starts[-1])
        self._len = (self.total_tokens - 1) // seq_len
        if self._len < 1:
            raise BigtrainError(
                f"{self.data_dir} holds {self.total_tokens} tokens, "
                f"fewer than one window of seq_len+1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return self._len

    def window(self, i: int) -> np.ndarray:
        """Tokens of window `i` as int64, length seq_len + 1 (may span several shards)."""
        if not 0 <= i < self._len:
            raise IndexError(f"window {i} out of range [0, {self._len})")
        pos = i * self.seq_len
        out = np.empty(self.seq_len + 1, dtype=np.int64)
        filled = 0
        # side="right" skips empty shards that share a start position with the next one.
        k = int(np.searchsorted(self._starts, pos, side="right")) - 1
        while filled < len(out):
            offset = pos + filled - int(self._starts[k])
            piece = self._shards[k][offset : offset + len(out) - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest["tokenizer"]["file"]


class WindowLoader:
    """Micro-batches of windows for one data-parallel rank, in a seeded global order.

    Position p of an endless stream is window perm_e[p % n] of epoch e = p // n; the permutation
    ignores the DP size, and the state counts global positions, so a resumed run may change
    dp_size, micro_batch or grad_accum and still see each window exactly once per epoch.
    """

    def __init__(
        self,
        data: PackedTokens,
        micro_batch: int,
        grad_accum: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        for name, value in (("micro_batch", micro_batch), ("grad_accum", grad_accum)):
            if value < 1:
                raise BigtrainError(f"{name} must be positive, got {value}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise BigtrainError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
        if seed < 0:
            raise BigtrainError(f"seed must be non-negative, got {seed}")
        self.data = data
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * grad_accum * dp_size
        self.consumed_windows = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(len(self.data)), epoch
        return self._perm

    def _window_ids(self, start: int) -> np.ndarray:
        """This rank's window ids for the global batch starting at stream position `start`."""
        per_rank = self.global_batch // self.dp_size
        positions = np.arange(per_rank, dtype=np.int64) + start + self.dp_rank * per_rank
        n = len(self.data)
        if not self.shuffle:
            return positions % n
        epochs = positions // n
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):  # at most a few: a batch rarely spans epochs
            mask = epochs == epoch
            ids[mask] = self._permutation(int(epoch))[positions[mask] % n]
        return ids

    def step_window_ids(self, step: int) -> np.ndarray:
        """Window ids this rank reads at optimizer step `step` (counted from position 0)."""
        return self._window_ids(step * self.global_batch)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches ([micro_batch, seq_len + 1] int64) for one step."""
        ids = self._window_ids(self.consumed_windows)
        self.consumed_windows += self.global_batch
        return [
            torch.from_numpy(np.stack([self.data.window(int(i)) for i in micro]))
            for micro in ids.reshape(self.grad_accum, self.micro_batch)
        ]

    def state_dict(self) -> dict:
        return {
            "consumed_windows": self.consumed_windows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_windows": len(self.data),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; seed, shuffle and window count must match."""
        current = self.state_dict()
        for key in ("seed", "shuffle", "num_windows"):
            if state[key] != current[key]:
                raise BigtrainError(
                    f"data loader state has {key}={state[key]} but this run has {current[key]}; "
                    "resume with the same data, seq_len and data seed"
                )
        self.consumed_windows = int(state["consumed_windows"])


def eval_batches(
    data: PackedTokens, micro_batch: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Windows 0, 1, 2, ... in fixed order, `micro_batch` at a time (the last may be smaller)."""
    if micro_batch < 1:
        raise BigtrainError(f"micro_batch must be positive, got {micro_batch}")
    stop = len(data) if max_batches is None else min(len(data), max_batches * micro_batch)
    for start in range(0, stop, micro_batch):
        ids = range(start, min(start + micro_batch, stop))
        yield torch.from_numpy(np.stack([data.window(i) for i in ids]))
