"""Results of a plan's finished runs, read from their `metrics.jsonl`, as rows of a CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from bigtrain.errors import BigtrainError
from bigtrain.scaling.plan import Plan
from bigtrain.scaling.run import run_state

RESULT_COLUMNS = ["loss", "val_loss", "tokens_per_s", "wall_s"]
FINAL_SHARE = 0.1  # the train loss is the mean of the records logged in the last 10 % of steps


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Training and validation records, one per step (a resumed run's later record wins)."""
    train: dict[int, dict] = {}
    val: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "val_loss" in record:
                val[record["step"]] = record
            elif "loss" in record:  # not checkpoint records
                train[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def summarize(run_dir: Path, steps: int) -> dict[str, Any]:
    """Final train loss (smoothed), final val loss, tokens/s and the time spent in steps.

    `wall_s` sums the logged step times: training only, without validation and checkpoints, and
    without the time lost to a crash before the resumed checkpoint.
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise BigtrainError(f"{path} not found: the run's metrics are missing")
    train, val = read_metrics(path)
    if not train:
        raise BigtrainError(f"{path} holds no training records")
    final = [r["loss"] for r in train if r["step"] > steps * (1 - FINAL_SHARE)] or [train[-1]["loss"]]
    wall, previous = 0.0, 0
    for record in train:
        wall += record["step_time_s"] * (record["step"] - previous)
        previous = record["step"]
    return {
        "loss": sum(final) / len(final),
        "val_loss": val[-1]["val_loss"] if val and val[-1]["step"] == train[-1]["step"] else None,
        "tokens_per_s": train[-1]["tokens"] / wall if wall else None,
        "wall_s": wall,
    }


def collect(plan: Plan) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows (the plan's columns plus results) of finished runs, and the names of unfinished ones."""
    rows, unfinished = [], []
    for run in plan.runs:
        if not run_state(run).finished:
            unfinished.append(run.name)
            continue
        rows.append({**run.row, **summarize(run.config.run.path, run.config.train.steps)})
    return rows, unfinished


def write_results(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
