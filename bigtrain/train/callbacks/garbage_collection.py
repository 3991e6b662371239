"""Python's garbage collector off during training, one collection at each logging step.

An automatic collection can start in any step, wherever allocations happen to cross its
threshold, and then walks every tracked object (with a large model and its data loader, tens of
milliseconds, and on many ranks a straggler every step for the others to wait on). torchtitan
disables it and collects at a fixed cadence instead; here that cadence is the logging steps
(`train.manual_gc`). The collector's own state is restored when the run ends, so a process that
trains several times (tests, sweeps) never keeps it off.
"""

from __future__ import annotations

import gc

from bigtrain.train.callbacks import Callback, Run

GENERATION = 1  # young objects only: the long-lived ones (model, loader) were collected at start


class GarbageCollection(Callback):
    """`gc.disable()` before the first step (after a full collection of the setup's garbage), a
    generation-1 collection after each logging step's record, the collector restored on close."""

    def __init__(self) -> None:
        self.was_enabled: bool | None = None

    def start(self, run: Run) -> None:
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def logged(self, run: Run) -> None:
        gc.collect(GENERATION)

    def close(self) -> None:
        if self.was_enabled:
            gc.enable()
        self.was_enabled = None
