"""`eval.tasks` during training: a short run on the embedded corpus evaluates the shipped task
before the first step, every `eval.every` steps and at the end; its accuracy rises from chance to
well above it, and the `eval/<task>/<metric>` records reach metrics.jsonl and W&B (offline) alike.
The last evaluation equals `bigtrain eval --tasks` on the final checkpoint."""

import json
import math

import pytest

from bigtrain.cli import main
from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.wandb_records import history

pytestmark = pytest.mark.slow  # trains 400 steps: a minute or two on 2 CPU cores
STEPS, EVERY, LIMIT = 400, 200, 200
KEY = "eval/python_next_line/acc"


@pytest.fixture(scope="module")
def run(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("in_loop") / "run"
    cfg = from_dict({
        "run": {"name": "tasks", "dir": str(run_dir), "seed": 7},
        "model": {"vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 256},
        "data": {"path": str(stdlib_data[0]), "val_path": str(stdlib_data[1]), "seq_len": 128, "micro_batch": 16},
        "train": {"steps": STEPS, "lr": 3e-3, "warmup_steps": 10, "device": "cpu"},
        "checkpoint": {"every": STEPS},
        "log": {"every": 100, "wandb": {"mode": "offline", "project": "tasks-test"}},
        "eval": {"tasks": ["python_next_line"], "every": EVERY, "limit": LIMIT, "val_every": 1000, "val_batches": 2},
    })
    result = train(cfg, console=False)
    return result, run_dir


def test_accuracy_rises_from_chance_to_well_above_it(run):
    result, run_dir = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if KEY in r]
    assert [r["step"] for r in evals] == [0, EVERY, STEPS]
    assert all(r["tokens"] == r["step"] * 16 * 128 for r in evals)
    first, last = evals[0][KEY], evals[-1][KEY]
    print(f"python_next_line accuracy over the first {LIMIT} documents: {[r[KEY] for r in evals]}")
    sigma = math.sqrt(0.25 * 0.75 / LIMIT)  # of an accuracy measured on LIMIT documents, at chance (25 %)
    assert abs(first - 0.25) < 3 * sigma  # the untrained model guesses
    assert last > 0.25 + 4 * sigma and last > first + 2 * sigma  # the trained one does not
    assert all(set(r) == {"step", "tokens", KEY, "eval_tasks_s"} for r in evals)  # in the loop: no stderr


def test_task_metrics_reach_wandb(run):
    _, run_dir = run
    (file,) = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = {row["_step"]: row for row in history(file)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if KEY in r]
    for record in evals:
        assert rows[record["step"]][KEY] == pytest.approx(record[KEY], rel=1e-12)
        assert rows[record["step"]]["eval_tasks_s"] == pytest.approx(record["eval_tasks_s"], rel=1e-12)


def test_cli_on_the_final_checkpoint_gives_the_last_in_loop_numbers(run, capsys):
    result, run_dir = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if KEY in r][-1]
    assert main(["eval", str(run_dir), "--tasks", "python_next_line", "--limit", str(LIMIT), "--device", "cpu"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|python_next_line")]
    cells = [cell.strip() for cell in row.split("|")]  # Tasks, Version, Filter, n-shot, Metric, ↑, Value, ±, Stderr
    assert cells[5] == "acc" and float(cells[7]) == pytest.approx(last[KEY], abs=5e-4)
    saved = json.loads((result.checkpoint.parent / f"lm_eval-{result.checkpoint.name}.json").read_text())
    (evaluation,) = saved["evaluations"]
    assert evaluation["results"]["python_next_line"]["acc,none"] == last[KEY]
    assert evaluation["bigtrain"]["limit"] == LIMIT and evaluation["n-samples"]["python_next_line"]["effective"] == LIMIT
