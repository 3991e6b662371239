"""`bigtrain eval CHECKPOINT --tasks …` as a user runs it: the harness's table, results appended to
a JSON file next to the checkpoint, perplexity still there; bad input is one line and exit 1."""

import json
import shutil
import subprocess
import sys

import pytest

from bigtrain.checkpoint.files import write_file_list
from bigtrain.eval.tasks import shipped_tasks
from bigtrain.train.loop import train
from tests.helpers import one_line_error, tiny_config


def bigtrain(*args):
    return subprocess.run([sys.executable, "-m", "bigtrain", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run_dir(stdlib_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval_cli") / "run"
    train(tiny_config(stdlib_data, run_dir, steps=4, val_every=1000), console=False)
    return run_dir


def table_row(stdout: str, task: str) -> list[str]:
    (row,) = [line for line in stdout.splitlines() if line.startswith(f"|{task}")]
    return [cell.strip() for cell in row.split("|")][1:-1]


def test_tasks_from_the_cli(run_dir, stdlib_data, tmp_path):
    proc = bigtrain("eval", run_dir, "--tasks", "python_next_line", "--limit", 12, "--batch-size", 5)
    assert proc.returncode == 0, proc.stderr
    task, version, filter_, shots, metric, _, value, _, stderr = table_row(proc.stdout, "python_next_line")
    assert (version, filter_, shots, metric) == ("1", "none", "0", "acc")
    assert float(value) * 12 == pytest.approx(round(float(value) * 12), abs=12 * 5e-5)  # k of 12, printed to 4 places
    results = run_dir / "checkpoints" / "lm_eval-step-0000004.json"
    assert f"wrote {results}" in proc.stdout
    assert "perplexity" not in proc.stdout  # tasks only, unless --data asks for it too
    # a second evaluation (another task file, few-shot) is appended; the first is kept
    copy = tmp_path / "copy"
    shutil.copytree(shipped_tasks()["python_next_line"].parent, copy)
    proc = bigtrain("eval", run_dir, "--tasks", copy / "python_next_line.yaml", "--limit", 4, "--num-fewshot", 1,
                    "--data", stdlib_data[1], "--max-batches", 1)
    assert proc.returncode == 0, proc.stderr
    assert table_row(proc.stdout, "python_next_line")[3] == "1" and "perplexity" in proc.stdout
    evaluations = json.loads(results.read_text())["evaluations"]
    assert [e["n-shot"]["python_next_line"] for e in evaluations] == [0, 1]
    assert [e["bigtrain"]["limit"] for e in evaluations] == [12, 4]
    assert evaluations[0]["results"]["python_next_line"]["acc,none"] == pytest.approx(float(value), abs=5e-5)


def test_bad_input_is_one_line(run_dir, tmp_path):
    one_line_error(bigtrain("eval", run_dir, "--tasks", "hellaswagg"), "unknown task 'hellaswagg'",
                   "did you mean hellaswag")
    (tmp_path / "bad.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    one_line_error(bigtrain("eval", run_dir, "--tasks", tmp_path / "bad.yaml"), f"task file {tmp_path / 'bad.yaml'} does not parse")
    one_line_error(bigtrain("eval", run_dir, "--tasks", tmp_path / "none.yaml"), "task file not found")
    one_line_error(bigtrain("eval", run_dir, "--tasks", "python_next_line", "--limit", 0), "--limit")

    no_tokenizer = tmp_path / "no_tokenizer"  # a complete checkpoint, written without its tokenizer
    shutil.copytree(run_dir / "checkpoints" / "step-0000004", no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    (no_tokenizer / "files.json").unlink()
    write_file_list(no_tokenizer)
    one_line_error(bigtrain("eval", no_tokenizer, "--tasks", "python_next_line"), "has no tokenizer.json")
    assert not list(tmp_path.glob("lm_eval-*.json"))
