"""The checkpoint mirror (`checkpoint.remote`) in the loop: every checkpoint uploads in the
background while training goes on; its arrival is logged at the next logging step where every
rank finished, before the next save (one upload at a time: local pruning never removes files in
flight) or at the end, where a final checkpoint that never arrived fails the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigtrain.checkpoint.io import checkpoint_root
from bigtrain.checkpoint.mirror import CheckpointMirror
from bigtrain.config import CheckpointConfig
from bigtrain.train.callbacks import Callback, Run


class Mirror(Callback):
    def __init__(self, cfg: CheckpointConfig):
        self.mirror = CheckpointMirror(cfg)  # reads the remote `latest` once, on rank 0

    def resume_from(self, run: Run, local: Path | None) -> Path | None:
        """Where a `run.resume=auto` run continues: the remote's latest fetched when there is no local
        checkpoint; a local one the remote missed (a job killed while uploading) is uploaded."""
        if local is None and self.mirror.reached:
            return self.mirror.fetch(checkpoint_root(run.run_dir), run.comm)
        if local is not None and local.name > (self.mirror.reached or ""):
            self.mirror.upload(local, run.comm)
        return local

    def logged(self, run: Run) -> None:
        self._log(run, self.mirror.poll(run.comm))

    def before_save(self, run: Run) -> None:
        self._log(run, self.mirror.wait(run.comm))

    def saved(self, run: Run, checkpoint: Path) -> None:
        self.mirror.upload(checkpoint, run.comm)

    def end(self, run: Run) -> None:
        self._log(run, self.mirror.wait(run.comm))
        self.mirror.check_final()

    @staticmethod
    def _log(run: Run, record: dict[str, Any] | None) -> None:
        """A checkpoint reached the remote (`checkpoint_upload_s`: rank 0's upload time)."""
        if record is not None:
            run.log({"step": run.step, **record})
