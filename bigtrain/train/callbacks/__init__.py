"""Callbacks: each feature around the training step (validation, lm-eval tasks, bad steps, the
checkpoint mirror, metric sinks) is one `Callback` that owns its cadence and its state. The loop
calls every callback at fixed points of a run, in list order; a checkpoint's state is the loop's
own (step, tokens, loader) plus every callback's `state_dict()`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from bigtrain.config import Config
from bigtrain.distributed.communicator import Communicator
from bigtrain.engine.contract import Engine, StepOutput


class Run(Protocol):
    """What a callback may read of the run it serves (the loop's `Trainer`)."""

    cfg: Config
    engine: Engine
    comm: Communicator
    step: int  # optimiser steps done
    tokens: int  # tokens trained on
    run_dir: Path
    global_batch: int  # windows per step, over all data-parallel ranks
    tokenizer_path: Path | None

    def log(self, record: dict[str, Any]) -> None: ...  # one record to every metric sink (rank 0's)


class Callback:
    """A feature of the run. Every hook does nothing unless overridden; `ending` is why the loop
    stops after this step (`done`, `out_of_time`, `preempted`) or None."""

    def setup(self, run: Run) -> None:
        """Once the engine and data exist, before resuming: load what must fail before step 1."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The checkpoint state a run resumes from (all of it: take your own keys)."""

    def start(self, run: Run) -> None:
        """Before the first step of this call."""

    def step_end(self, run: Run, out: StepOutput) -> None:
        """After every step (cheap: no host sync)."""

    def metrics(self, run: Run) -> dict[str, Any]:
        """Values to add to a logging step's record."""
        return {}

    def logged(self, run: Run) -> None:
        """After a logging step's record, where every rank meets anyway."""

    def after_step(self, run: Run, ending: str | None) -> None:
        """Periodic work of its own (not counted as step time)."""

    def before_save(self, run: Run) -> None:
        """Before a checkpoint is written."""

    def saved(self, run: Run, checkpoint: Path) -> None:
        """After checkpoint `checkpoint` is complete locally."""

    def end(self, run: Run) -> None:
        """After the last step of a run that did not fail."""

    def close(self) -> None:
        """Always, last (also after an error)."""

    def state_dict(self) -> dict[str, Any]:
        """Top-level entries for the checkpoint's state (keys unique across callbacks)."""
        return {}
