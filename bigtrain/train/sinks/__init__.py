"""Metric sinks: small writers the loop hands every record to (console, metrics.jsonl, W&B).

A record is one flat dict: a training step (`loss`, `tokens_per_s`, `mfu`, `time_*_s`, …),
a validation (`val_loss`, `val_perplexity`), an lm-eval task evaluation (`eval/<task>/<metric>`)
or a checkpoint (`checkpoint_stall_s`, `checkpoint_write_s`, `checkpoint_gb`; `checkpoint_upload_s` once it reached
`checkpoint.remote`).
Only rank 0 builds sinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from bigtrain.config import Config
from bigtrain.distributed.launcher_watch import check_launcher
from bigtrain.train.callbacks import Callback, Run


class Sink(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class Sinks(Callback):
    """Fans each record out to every sink of rank 0, built when the run starts (they continue a
    resumed run: the console from its step, W&B in its run); the other ranks log nothing."""

    def __init__(self, cfg: Config, console: bool):
        self.cfg, self.console = cfg, console
        self.sinks: list[Sink] = []
        self.resumed: dict[str, Any] = {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.resumed = state

    def start(self, run: Run) -> None:
        if run.comm.is_main and not self.sinks:
            self.sinks = build_sinks(self.cfg, run.run_dir, run.step, self.resumed, self.console)

    def log(self, record: dict[str, Any]) -> None:
        check_launcher()  # an orphaned worker writes no record
        for sink in self.sinks:
            sink.log(record)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sink in self.sinks:
            out.update(getattr(sink, "state", dict)())
        return out

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_sinks(cfg: Config, run_dir: Path, start_step: int, resumed: dict[str, Any], console: bool) -> list[Sink]:
    """The configured sinks; `resumed` is the checkpoint state a run continues from."""
    from bigtrain.train.sinks.console import ConsoleSink
    from bigtrain.train.sinks.jsonl import JsonlSink

    sinks: list[Sink] = [JsonlSink(run_dir / "metrics.jsonl")]
    if console:
        sinks.append(ConsoleSink(cfg.train.steps, start_step))
    if cfg.log.wandb.mode != "disabled":
        from bigtrain.train.sinks.wandb_sink import WandbSink  # imports wandb: only when asked for

        sinks.append(WandbSink(cfg, run_dir, resumed.get(WandbSink.STATE_KEY)))
    return sinks
