"""Bad steps — updates skipped for a NaN/Inf or a spike — counted, and what follows too many in a
row: the run stops (`train.nonfinite`, `train.max_bad_steps`) or rolls back to its last checkpoint
and skips the data that caused them (`train.rollback_after`, `train.rollback_skip_steps`).

The engine asks this callback's `gate` whether to apply each update (`UpdateGate`); the gate's
spike window and the counters are checkpointed here. The counters stay on the device and are
read only where the loop syncs anyway (at logged steps and before saving), so a GPU run gains no
per-step host sync. A run of bad steps is therefore seen at the next logged step or save;
meanwhile skipped steps change no weights, and nothing is saved past the limit, so the last good
checkpoint stays the newest.

A rollback's data skip is recorded in `<run dir>/data_skips.json` (`DataSkips`) before the
checkpoint is reloaded, and read whenever the run starts, so a resumed or requeued run skips the
same windows at the same step: a run passing step `from_step` draws and discards `steps` steps'
batches there. A checkpoint taken after that point holds the loader past them, and nothing is
skipped twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint.io import latest_checkpoint
from bigtrain.config import Config
from bigtrain.distributed import agreement
from bigtrain.engine.contract import StepOutput
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.train.callbacks import Callback, Run

STATE_KEY = "bad_steps"
SKIPS_FILE = "data_skips.json"


class DataSkips:
    """The data windows a run skips: `<run dir>/data_skips.json`, a list of
    {"from_step", "steps", "checkpoint", "rollback_at_step"} entries (rank 0 writes it atomically)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / SKIPS_FILE
        self.entries: list[dict[str, Any]] = []

    def read(self) -> None:
        """The recorded entries, as rank 0 reads them, on every rank."""
        def read() -> list[dict[str, Any]]:
            if not self.path.exists():
                return []
            try:
                return list(json.loads(self.path.read_text())["skips"])
            except (ValueError, KeyError, TypeError) as e:
                raise BigtrainError(f"{self.path} is not a data-skip list ({e}); fix or remove it") from None

        self.entries = agreement.from_main(read)

    def add(self, entry: dict[str, Any], is_main: bool) -> None:
        self.entries.append(entry)
        if is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump({"skips": self.entries}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)

    def steps_at(self, step: int) -> int:
        """Steps' worth of batches to discard before training step `step` (0-based: `step` steps done)."""
        return sum(e["steps"] for e in self.entries if e["from_step"] == step)

    def rollbacks_to(self, checkpoint: str) -> int:
        return sum(1 for e in self.entries if e.get("checkpoint") == checkpoint)


class BadSteps(Callback):
    def __init__(self, cfg: Config):
        train = cfg.train
        # handed to the engine, which consults it every step
        self.gate = UpdateGate.from_config(train, pipelined=cfg.parallel.pp > 1)
        self.policy = train.nonfinite
        self.limit = 1 if train.nonfinite == "stop" else train.max_bad_steps
        self.rollback_after, self.rollback_skip_steps = train.rollback_after, train.rollback_skip_steps
        self.max_rollbacks = train.max_rollbacks
        self.skips = DataSkips(cfg.run.path)
        self._total = torch.zeros((), dtype=torch.long)
        self._spikes = torch.zeros((), dtype=torch.long)
        self._streak = torch.zeros((), dtype=torch.long)
        self.rollbacks = 0
        self._due = 0  # the run of bad steps that calls for a rollback (0: none)
        self._rolling_back = False

    def setup(self, run: Run) -> None:
        self.skips.read()

    def step_end(self, run: Run, out: StepOutput) -> None:
        """Count one step (no host sync: `out.skipped` may live on the GPU)."""
        bad = out.skipped.to(torch.long)
        self._total = self._total.to(bad.device) + bad
        self._streak = (self._streak.to(bad.device) + 1) * bad
        if self.gate.window:
            spike = out.skipped & self.gate.spiked.to(out.skipped.device)
            self._spikes = self._spikes.to(bad.device) + spike.to(torch.long)
            self.gate.spiked = torch.zeros_like(spike)  # a step the gate is not asked about (ZeRO skipped it) is no spike

    def total(self) -> int:
        return int(self._total)

    def metrics(self, run: Run) -> dict[str, Any]:
        return {"skipped_steps": self.total(), "spike_skips": int(self._spikes), "rollbacks": self.rollbacks}

    def logged(self, run: Run) -> None:
        self.check(run)

    def before_save(self, run: Run) -> None:
        self.check(run)  # never save past the allowed run of bad steps

    def check(self, run: Run) -> None:
        """Stop the run (a `BigtrainError`) once `limit` bad steps came in a row; with
        `rollback_after`, note that many for `rollback_due` instead."""
        streak = int(self._streak)
        if self.rollback_after is not None:
            self._due = streak if streak >= self.rollback_after else 0
        elif streak >= self.limit:
            raise BigtrainError(self._stopped(run, streak))

    def _stopped(self, run: Run, streak: int, why: str = "stopped") -> str:
        last = latest_checkpoint(run.run_dir)
        kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
        return (f"{streak} bad step(s) in a row up to step {run.step} (non-finite or spiking loss or gradient; "
                f"updates skipped, train.nonfinite={self.policy}): {why}; {kept}; lower train.lr or check the data")

    def rollback_due(self, run: Run, saving: bool) -> bool:
        """Whether the run must go back to its last checkpoint now (`train.rollback_after` bad steps
        in a row, seen at a logged step, or read here before a save: nothing is saved past them)."""
        if self.rollback_after is None:
            return False
        if saving:
            self.check(run)
        return self._due > 0

    def plan_rollback(self, run: Run, checkpoint: Path | None) -> None:
        """Record the data skip of a rollback to `checkpoint` (in `data_skips.json`, before the
        reload) and log it; refuse (a `BigtrainError`) without a checkpoint or past `max_rollbacks`."""
        streak = self._due
        if checkpoint is None:
            raise BigtrainError(self._stopped(run, streak, "cannot roll back"))
        if self.skips.rollbacks_to(checkpoint.name) >= self.max_rollbacks:
            raise BigtrainError(self._stopped(
                run, streak, f"stopped after train.max_rollbacks={self.max_rollbacks} rollbacks to {checkpoint.name}"))
        checkpoint_step = int(checkpoint.name.removeprefix("step-"))
        start = max(run.step - streak, checkpoint_step)  # the first bad step's data, unless saved since
        steps = run.step - start if self.rollback_skip_steps is None else self.rollback_skip_steps
        entry = {"from_step": start, "steps": steps, "checkpoint": checkpoint.name, "rollback_at_step": run.step}
        self.skips.add(entry, run.comm.is_main)
        self.rollbacks += 1
        self._due, self._rolling_back = 0, True
        run.log({"step": run.step, "rollback": checkpoint.name, "rollbacks": self.rollbacks,
                 "bad_steps_in_a_row": streak, "skipped_data_from_step": start, "skipped_data_steps": steps})

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: {"total": self.total(), "spikes": int(self._spikes), "streak": int(self._streak),
                            "rollbacks": self.rollbacks, **self.gate.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resume takes everything; a rollback the gate's window alone (the counters go on)."""
        mine = state.get(STATE_KEY, {})
        self.gate.load_state_dict(mine)
        self._streak = torch.zeros((), dtype=torch.long)
        if self._rolling_back:
            self._rolling_back = False
            return
        self._total = torch.tensor(mine.get("total", 0))
        self._spikes = torch.tensor(mine.get("spikes", 0))
        self._streak = torch.tensor(mine.get("streak", 0))
        self.rollbacks = mine.get("rollbacks", 0)
