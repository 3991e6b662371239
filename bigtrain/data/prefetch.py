"""Overlapped data loading: the next step's micro-batches are read while the current step runs."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from bigtrain.data.build import TrainLoader


class Prefetcher:
    """Wraps a train loader so that one step's batches are always being prepared in a background
    thread, in pinned (page-locked) memory when they go to a GPU so that the engines' non-blocking
    host→device copies overlap with compute. Batches, order and resumable state are the wrapped
    loader's own: `state_dict` is the state after the last step handed out, not the one read ahead.
    """

    def __init__(self, loader: TrainLoader, pin_memory: bool = False) -> None:
        self.loader, self.pin_memory = loader, pin_memory
        self.global_batch = loader.global_batch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bigtrain-prefetch")
        self._pending: Future | None = None  # (state before the batches, the batches)

    def _fetch(self) -> tuple[dict, list[torch.Tensor]]:
        state = self.loader.state_dict()
        batches = self.loader.next_step()
        if self.pin_memory:
            batches = [b.pin_memory() for b in batches]
        return state, batches

    def next_step(self) -> list[torch.Tensor]:
        if self._pending is None:
            self._pending = self._pool.submit(self._fetch)
        _, batches = self._pending.result()
        self._pending = self._pool.submit(self._fetch)
        return batches

    def state_dict(self) -> dict:
        return self.loader.state_dict() if self._pending is None else self._pending.result()[0]

    def load_state_dict(self, state: dict) -> None:
        if self._pending is not None:  # drop what was read ahead from the old position
            self._pending.result()
            self._pending = None
        self.loader.load_state_dict(state)

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size

    @property
    def max_token_id(self) -> int:
        return self.loader.max_token_id

    @property
    def tokenizer_path(self) -> Path:
        return self.loader.tokenizer_path
