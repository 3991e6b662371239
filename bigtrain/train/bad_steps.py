"""Bad steps — updates skipped for a NaN/Inf or a loss spike — counted, and the run stopped after
too many in a row (`train.nonfinite`, `train.max_bad_steps`).

The counters stay on the device and are read only where the loop syncs anyway (at logged steps
and before saving), so a GPU run gains no per-step host sync. A run of bad steps is therefore seen
at the next logged step or save; meanwhile skipped steps change no weights, and nothing is saved
past the limit, so the last good checkpoint stays the newest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bigtrain.checkpoint.io import latest_checkpoint
from bigtrain.config import TrainConfig
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.errors import BigtrainError


class BadSteps:
    def __init__(self, cfg: TrainConfig):
        self.policy = cfg.nonfinite
        self.limit = 1 if cfg.nonfinite == "stop" else cfg.max_bad_steps
        self._total = torch.zeros((), dtype=torch.long)
        self._streak = torch.zeros((), dtype=torch.long)

    def record(self, skipped: torch.Tensor) -> None:
        """Count one step (no host sync: `skipped` may live on the GPU)."""
        bad = skipped.to(torch.long)
        self._total = self._total.to(bad.device) + bad
        self._streak = (self._streak.to(bad.device) + 1) * bad

    def total(self) -> int:
        return int(self._total)

    def check(self, step: int, run_dir: Path) -> None:
        """Stop the run (a `BigtrainError`) once `limit` bad steps came in a row."""
        streak = int(self._streak)
        if streak >= self.limit:
            last = latest_checkpoint(run_dir)
            kept = f"the last good checkpoint {last} is intact" if last else "no checkpoint was written"
            raise BigtrainError(
                f"{streak} bad step(s) in a row up to step {step} (non-finite or spiking loss or gradient; "
                f"updates skipped, train.nonfinite={self.policy}): stopped; {kept}; lower train.lr or check the data"
            )

    def state_dict(self, gate: UpdateGate) -> dict[str, Any]:
        return {"total": self.total(), "streak": int(self._streak), **gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any], gate: UpdateGate) -> None:
        self._total = torch.tensor(state.get("total", 0))
        self._streak = torch.tensor(state.get("streak", 0))
        gate.load_state_dict(state)
