"""Weights & Biases: the resolved config as the run config, every record as history at its step.

The run id goes into each checkpoint's state, so a resumed or requeued job continues the same
W&B run instead of starting a new one. Files land in `<run dir>/wandb/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

from bigtrain.config import Config
from bigtrain.errors import BigtrainError


class WandbSink:
    STATE_KEY = "wandb_run_id"

    def __init__(self, cfg: Config, run_dir: Path, run_id: str | None):
        w = cfg.log.wandb
        try:
            self.run = wandb.init(
                project=w.project, entity=w.entity, name=w.name or cfg.run.name, group=w.group,
                tags=w.tags or None, config=cfg.to_dict(), dir=str(run_dir), mode=w.mode,
                id=run_id, resume="allow" if run_id else None,
            )
        except (wandb.Error, OSError) as e:
            raise BigtrainError(f"log.wandb: cannot start a W&B run: {str(e).splitlines()[0]}") from None

    def log(self, record: dict[str, Any]) -> None:
        """Every value at its step; a list (an MoE block's load per expert) as a histogram over its indices."""
        data = {key: wandb.Histogram(np_histogram=(value, list(range(len(value) + 1)))) if isinstance(value, list) else value
                for key, value in record.items() if key != "step" and value is not None}
        self.run.log(data, step=record["step"])

    def state(self) -> dict[str, Any]:
        return {self.STATE_KEY: self.run.id}

    def close(self) -> None:
        self.run.finish()
