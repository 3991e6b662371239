"""Bad steps — updates skipped for a NaN/Inf or a loss spike — counted, and the run stopped after
too many in a row (`train.nonfinite`, `train.max_bad_steps`).

The engine asks this callback's `gate` whether to apply each update (`UpdateGate`); the gate's
running loss mean and the counters are checkpointed here. The counters stay on the device and are
read only where the loop syncs anyway (at logged steps and before saving), so a GPU run gains no
per-step host sync. A run of bad steps is therefore seen at the next logged step or save;
meanwhile skipped steps change no weights, and nothing is saved past the limit, so the last good
checkpoint stays the newest.
"""

from __future__ import annotations

from typing import Any

import torch

from bigtrain.checkpoint.io import latest_checkpoint
from bigtrain.config import TrainConfig
from bigtrain.engine.contract import StepOutput
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.train.callbacks import Callback, Run

STATE_KEY = "bad_steps"


class BadSteps(Callback):
    def __init__(self, cfg: TrainConfig):
        self.gate = UpdateGate(cfg.spike_factor)  # handed to the engine, which consults it every step
        self.policy = cfg.nonfinite
        self.limit = 1 if cfg.nonfinite == "stop" else cfg.max_bad_steps
        self._total = torch.zeros((), dtype=torch.long)
        self._streak = torch.zeros((), dtype=torch.long)

    def step_end(self, run: Run, out: StepOutput) -> None:
        """Count one step (no host sync: `out.skipped` may live on the GPU)."""
        bad = out.skipped.to(torch.long)
        self._total = self._total.to(bad.device) + bad
        self._streak = (self._streak.to(bad.device) + 1) * bad

    def total(self) -> int:
        return int(self._total)

    def metrics(self, run: Run) -> dict[str, Any]:
        return {"skipped_steps": self.total()}

    def logged(self, run: Run) -> None:
        self.check(run)

    def before_save(self, run: Run) -> None:
        self.check(run)  # never save past the allowed run of bad steps

    def check(self, run: Run) -> None:
        """Stop the run (a `BigtrainError`) once `limit` bad steps came in a row."""
        streak = int(self._streak)
        if streak >= self.limit:
            last = latest_checkpoint(run.run_dir)
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
            raise BigtrainError(
                f"{streak} bad step(s) in a row up to step {run.step} (non-finite or spiking loss or gradient; "
                f"updates skipped, train.nonfinite={self.policy}): stopped; {kept}; lower train.lr or check the data"
            )

    def state_dict(self) -> dict[str, Any]:
        return {STATE_KEY: {"total": self.total(), "streak": int(self._streak), **self.gate.state_dict()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state.get(STATE_KEY, {})
        self._total = torch.tensor(mine.get("total", 0))
        self._streak = torch.tensor(mine.get("streak", 0))
        self.gate.load_state_dict(mine)
