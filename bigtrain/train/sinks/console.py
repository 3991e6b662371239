"""The console: a rich progress bar with ETA on a terminal, one plain line per record otherwise
(Slurm logs, pipes), so both read well."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ConsoleSink:
    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start = total_steps, start_step
        self.started = time.perf_counter()
        self.progress: Progress | None = None
        if sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(bar_width=30), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=Console(), transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def log(self, record: dict[str, Any]) -> None:
        line = format_record(record)
        if self.progress is None:
            if "loss" in record:
                line += f" | eta {_duration(self._eta(record['step']))}"
            print(line, flush=True)
        else:  # the full line scrolls above the bar, which keeps step, ETA and the last loss
            self.progress.console.print(line, highlight=False)
            if "loss" in record:
                self.progress.update(self.task, completed=record["step"], stats=f"loss {record['loss']:.4f}")

    def _eta(self, step: int) -> float:
        done = max(step - self.start, 1)
        return (time.perf_counter() - self.started) / done * (self.total - step)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def format_record(r: dict[str, Any]) -> str:
    """One line per record: training step, validation or checkpoint."""
    head = f"step {r['step']:>6}"
    if "val_loss" in r:
        return f"{head} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_perplexity']:.2f}"
    tasks = {k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/") and not k.endswith("_stderr")}
    if tasks:
        took = [f"{r['eval_tasks_s']:.1f} s"] if "eval_tasks_s" in r else []
        return " | ".join([head, *(f"{name} {value:.4f}" for name, value in tasks.items()), *took])
    if "checkpoint_upload_s" in r:
        return f"{head} | uploaded {r['checkpoint_remote']} in {r['checkpoint_upload_s']:.1f} s"
    if "checkpoint_write_s" in r:
        waited = "" if r["checkpoint_stall_s"] == r["checkpoint_write_s"] else f", loop waited {r['checkpoint_stall_s']:.2f} s"
        return (f"{head} | saved {r['checkpoint']} ({r['checkpoint_gb']:.3f} GB in {r['checkpoint_write_s']:.1f} s"
                f"{waited})")
    parts = [head, f"loss {r['loss']:.4f}", *([f"z_loss {r['z_loss']:.4g}"] if "z_loss" in r else []),
             *([f"moe aux {r['moe/aux_loss']:.3f} max_load {r['moe/max_load']:.2f}"] if "moe/max_load" in r else []),
             f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}", f"{r['tokens_per_s'] / 1e3:.1f}k tok/s"]
    if r.get("mfu") is not None:
        parts.append(f"mfu {100 * r['mfu']:.1f}%")
    parts.append(f"{r['step_time_s'] * 1e3:.0f} ms/step")
    parts.append(f"mem {r['peak_mem_gb']:.2f} GB")
    if r.get("loss_scale") is not None:
        parts.append(f"scale {r['loss_scale']:g}")
    if r.get("skipped_steps"):
        parts.append(f"skipped {r['skipped_steps']}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
