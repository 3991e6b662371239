"""Packed `seq_len + 1` token windows over memory-mapped shards, in a rank-free global order."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from bigtrain.data.permutation import Permutation
from bigtrain.data.shards import check_shard_checksum, load_manifest, read_shard_tokens
from bigtrain.errors import BigtrainError

_verified: set[tuple[str, str]] = set()  # (shard path, sha256) already checked in this process


class Windows(Protocol):
    """Anything with numbered windows: a dataset, a split of one, or several concatenated."""

    def __len__(self) -> int: ...
    def window(self, i: int) -> np.ndarray: ...
    def windows(self, ids: np.ndarray) -> np.ndarray: ...


class PackedTokens:
    """All shards of a prepared dataset as one token stream, cut into overlapping windows.

    Window i is tokens [i*seq_len, (i+1)*seq_len + 1) of the stream (or of `token_range` of it):
    inputs and next-token targets in one row. Shards are memory-mapped, never copied; their sizes
    are checked against the manifest, and with `verify_checksums` their sha256 too.
    """

    def __init__(
        self,
        data_dir: Path | str,
        seq_len: int,
        verify_checksums: bool = False,
        token_range: tuple[int, int] | None = None,
    ) -> None:
        if seq_len < 1:
            raise BigtrainError(f"seq_len must be positive, got {seq_len}")
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.manifest = load_manifest(self.data_dir)
        self._shards: list[np.ndarray] = []
        for entry in self.manifest["shards"]:
            path = self.data_dir / entry["file"]
            tokens = read_shard_tokens(path, entry["bytes"])
            if len(tokens) != entry["tokens"]:
                raise BigtrainError(
                    f"shard {path} holds {len(tokens)} tokens, "
                    f"manifest says {entry['tokens']} (run `bigtrain data verify`)"
                )
            if verify_checksums and (str(path), entry["sha256"]) not in _verified:
                check_shard_checksum(path, entry["sha256"])
                _verified.add((str(path), entry["sha256"]))
            self._shards.append(tokens)
        # _starts[k] is the stream position of shard k's first token; _starts[-1] is the total.
        self._starts = np.cumsum([0] + [len(t) for t in self._shards])
        self.stream_tokens = int(self._starts[-1])
        self._begin, end = token_range or (0, self.stream_tokens)
        self.total_tokens = end - self._begin
        self._len = max(0, (self.total_tokens - 1) // seq_len)
        if self._len < 1:
            where = f"{self.data_dir}" + (f" tokens [{self._begin}, {end})" if token_range else "")
            raise BigtrainError(
                f"{where} holds {self.total_tokens} tokens, "
                f"fewer than one window of seq_len+1 = {seq_len + 1}"
            )

    def __len__(self) -> int:
        return self._len

    def window(self, i: int) -> np.ndarray:
        """Tokens of window `i` as int64, length seq_len + 1 (may span several shards)."""
        return self.windows(np.array([i]))[0]

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Tokens of windows `ids` as an int64 array [len(ids), seq_len + 1], copied once."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and not (0 <= ids.min() and ids.max() < self._len):
            raise IndexError(f"window ids {ids.min()}..{ids.max()} out of range [0, {self._len})")
        width = self.seq_len + 1
        out = np.empty((len(ids), width), dtype=np.int64)
        positions = self._begin + ids * self.seq_len
        # side="right" skips empty shards that share a start position with the next one.
        shards = np.searchsorted(self._starts, positions, side="right") - 1
        for row, (pos, k) in enumerate(zip(positions.tolist(), shards.tolist(), strict=True)):
            offset = pos - int(self._starts[k])
            piece = self._shards[k][offset : offset + width]
            out[row, : len(piece)] = piece
            filled = len(piece)
            while filled < width:  # the window runs on into the next shard(s)
                k += 1
                piece = self._shards[k][: width - filled]
                out[row, filled : filled + len(piece)] = piece
                filled += len(piece)
        return out

    def split(self, val_fraction: float) -> tuple[PackedTokens, PackedTokens]:
        """(train, val): the stream cut at the first document end after 1 - `val_fraction` of it.

        Both halves keep whole documents, so no document is seen in training and validation.
        """
        if not 0.0 < val_fraction < 1.0:
            raise BigtrainError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        target = self._begin + round((1.0 - val_fraction) * self.total_tokens)
        end = self._begin + self.total_tokens
        cut = end
        k = int(np.searchsorted(self._starts, max(target - 1, 0), side="right")) - 1
        while k < len(self._shards) and cut == end:
            offset = max(target - 1 - int(self._starts[k]), 0)
            hits = np.flatnonzero(self._shards[k][offset:] == self.eos_id)
            if len(hits):
                cut = min(end, int(self._starts[k]) + offset + int(hits[0]) + 1)
            k += 1
        return self._view(self._begin, cut), self._view(cut, end)

    def _view(self, begin: int, end: int) -> PackedTokens:
        view = copy.copy(self)
        view._begin, view.total_tokens = begin, end - begin
        view._len = max(0, (end - begin - 1) // self.seq_len)
        if view._len < 1:
            raise BigtrainError(
                f"{self.data_dir}: tokens [{begin}, {end}) hold fewer than one window of "
                f"seq_len+1 = {self.seq_len + 1}; change data.val_fraction"
            )
        return view

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.manifest["tokenizer"]["eos_id"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def max_token_id(self) -> int:
        return max((int(e["max_token_id"]) for e in self.manifest["shards"]), default=-1)

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest["tokenizer"]["file"]


class ConcatWindows:
    """Several window sets one after another (validation over several sources)."""

    def __init__(self, parts: list[Windows]) -> None:
        self.parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k].window(i - int(self._starts[k]))

    def windows(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self.window(int(i)) for i in ids])


PERMUTATION_BLOCK = 1 << 14  # positions of an epoch whose window ids are computed together
_WEYL = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd: a low-discrepancy sequence


class Mixture:
    """Several datasets drawn with fixed weights, one source per stream position.

    Position p goes to the source whose share of [0, 1) holds frac(p / golden ratio): a Weyl
    sequence, so after any n positions each source has had its weight's share up to a few
    windows, deterministically and with no state but p. Global window ids are the sources'
    window ids offset by the sizes of the sources before them.
    """

    def __init__(self, sources: list[PackedTokens], weights: list[float]) -> None:
        if not sources or len(sources) != len(weights):
            raise BigtrainError("a mixture needs one weight per source")
        if any(not w > 0 for w in weights):
            raise BigtrainError(f"mixture weights must be positive, got {weights}")
        self.sources = sources
        total = float(sum(weights))
        self.weights = [w / total for w in weights]
        bounds = np.cumsum(self.weights)[:-1]
        self._bounds = np.array([min(int(b * 2**64), 2**64 - 1) for b in bounds], dtype=np.uint64)
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def window(self, i: int) -> np.ndarray:
        """Window of global id `i`."""
        return self.windows(np.array([i]))[0]

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """Windows of global ids `ids`, each read from its source."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and not (0 <= ids.min() and ids.max() < len(self)):
            raise IndexError(f"window ids {ids.min()}..{ids.max()} out of range [0, {len(self)})")
        source = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.sources[0].seq_len + 1), dtype=np.int64)
        for k in np.unique(source):
            mask = source == k
            out[mask] = self.sources[k].windows(ids[mask] - self.offsets[k])
        return out

    def source_of(self, positions: np.ndarray) -> np.ndarray:
        """The source index of each stream position."""
        x = positions.astype(np.uint64) * _WEYL
        return np.searchsorted(self._bounds, x, side="right")

    def counts_before(self, position: int, chunk: int = 1 << 22) -> np.ndarray:
        """How many of positions [0, position) each source received."""
        if len(self.sources) == 1:
            return np.array([position], dtype=np.int64)
        counts = np.zeros(len(self.sources), dtype=np.int64)
        for start in range(0, position, chunk):
            stop = min(start + chunk, position)
            counts += np.bincount(self.source_of(np.arange(start, stop)), minlength=len(counts))
        return counts


class WindowLoader:
    """Micro-batches of windows for one data-parallel rank, in a seeded global order.

    Stream position p belongs to a source (always the same one without a mixture); the source's
    q-th position is its window perm_e(q % n) of its epoch e = q // n. Neither depends on the DP
    size and the state counts global positions, so a resumed run may change dp_size, micro_batch
    or grad_accum and still see every window once per epoch.
    """

    def __init__(
        self,
        data: PackedTokens | Mixture,
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
        self.mixture = data if isinstance(data, Mixture) else Mixture([data], [1.0])
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = micro_batch * grad_accum * dp_size
        self.consumed_windows = 0
        self._counts_at = (0, np.zeros(len(self.mixture.sources), dtype=np.int64))
        self._blocks: dict[tuple[int, int], np.ndarray] = {}  # window ids of an epoch's block

    def _order(self, source: int, local: np.ndarray) -> np.ndarray:
        """Window ids (within `source`) at the source's own stream positions `local`."""
        n = len(self.mixture.sources[source])
        if not self.shuffle:
            return local % n
        # Positions are read in order, so each epoch's permutation is evaluated a block at a time.
        epochs, offsets = np.divmod(local, n)
        n_blocks = -(-n // PERMUTATION_BLOCK)
        keys = epochs * n_blocks + offsets // PERMUTATION_BLOCK
        ids = np.empty_like(local)
        for key in np.unique(keys).tolist():
            epoch, block = divmod(key, n_blocks)
            if (source, key) not in self._blocks:
                if len(self._blocks) > 4 * len(self.mixture.sources):
                    self._blocks.clear()
                start = block * PERMUTATION_BLOCK
                positions = np.arange(start, min(start + PERMUTATION_BLOCK, n), dtype=np.int64)
                perm = Permutation(n, [self.seed, source, epoch])
                self._blocks[(source, key)] = perm(positions)
            mask = keys == key
            ids[mask] = self._blocks[(source, key)][offsets[mask] - block * PERMUTATION_BLOCK]
        return ids

    def _global_batch(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources and global window ids of the whole global batch at stream position `start`."""
        mix = self.mixture
        cached_at, counts = self._counts_at
        if cached_at != start:
            counts = mix.counts_before(start)
        sources = mix.source_of(np.arange(start, start + self.global_batch, dtype=np.int64))
        ids = np.empty(self.global_batch, dtype=np.int64)
        for s in range(len(mix.sources)):
            mask = sources == s
            local = counts[s] + np.arange(int(mask.sum()), dtype=np.int64)
            ids[mask] = mix.offsets[s] + self._order(s, local)
        self._counts_at = (
            start + self.global_batch,
            counts + np.bincount(sources, minlength=len(counts)),
        )
        return sources, ids

    def _window_ids(self, start: int) -> np.ndarray:
        """This rank's window ids for the global batch starting at stream position `start`."""
        per_rank = self.global_batch // self.dp_size
        _, ids = self._global_batch(start)
        return ids[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]

    def step_window_ids(self, step: int) -> np.ndarray:
        """Window ids this rank reads at optimizer step `step` (counted from position 0)."""
        return self._window_ids(step * self.global_batch)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's grad_accum micro-batches ([micro_batch, seq_len + 1] int64) for one step."""
        ids = self._window_ids(self.consumed_windows)
        self.consumed_windows += self.global_batch
        return list(torch.from_numpy(self.data.windows(ids)).split(self.micro_batch))

    def state_dict(self) -> dict:
        return {
            "backend": "arrow",
            "consumed_windows": self.consumed_windows,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_windows": [len(s) for s in self.mixture.sources],
            "weights": self.mixture.weights,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data, weights, seed and shuffle must match."""
        current = self.state_dict()
        for key in ("backend", "seed", "shuffle", "num_windows", "weights"):
            if state.get(key) != current[key]:
                raise BigtrainError(
                    f"data loader state has {key}={state.get(key)} but this run has "
                    f"{current[key]}; resume with the same data, seq_len and data seed"
                )
        self.consumed_windows = int(state["consumed_windows"])

    @property
    def vocab_size(self) -> int:
        return self.mixture.sources[0].vocab_size

    @property
    def max_token_id(self) -> int:
        return max(s.max_token_id for s in self.mixture.sources)

    @property
    def tokenizer_path(self) -> Path:
        return self.mixture.sources[0].tokenizer_path


def eval_batches(
    data: Windows, micro_batch: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Windows 0, 1, 2, ... in fixed order, `micro_batch` at a time (the last may be smaller)."""
    if micro_batch < 1:
        raise BigtrainError(f"micro_batch must be positive, got {micro_batch}")
    stop = len(data) if max_batches is None else min(len(data), max_batches * micro_batch)
    for start in range(0, stop, micro_batch):
        yield torch.from_numpy(data.windows(np.arange(start, min(start + micro_batch, stop))))
