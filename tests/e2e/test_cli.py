"""The `bigtrain` command end to end, as a user runs it (a real subprocess each time)."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import one_line_error

CONFIGS = Path(__file__).parents[2] / "configs"


def bigtrain(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bigtrain", *map(str, args)], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs")
    proc = bigtrain("quickstart", "--out", out, "--steps", 48, "--corpus-mb", 2)  # steps, not minutes: no wall-clock dependence
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


def test_quickstart_trains_and_reports(quickstart_run):
    out, stdout = quickstart_run
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert "trained 48 steps" in stdout and len(val) == 5  # before training and every 12 steps
    assert val[0] > 7.5  # ln(4096) = 8.32 before training
    assert val[-1] < val[0] - 1.0, val  # validation loss clearly falls (perplexity ÷ e)
    assert f"validation loss {val[0]:.3f} → {val[-1]:.3f}" in stdout
    accuracy = [r["eval/python_next_line/acc"] for r in records if "eval/python_next_line/acc" in r]
    assert len(accuracy) == 2 and f"python_next_line accuracy {accuracy[0]:.3f} → {accuracy[1]:.3f}" in stdout
    latest = (out / "run" / "checkpoints" / "latest").read_text().strip()
    assert f"checkpoint     {out / 'run' / 'checkpoints' / latest}" in stdout
    manifest = json.loads((out / "data" / "train" / "manifest.json").read_text())
    assert manifest["token_dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 4096


def test_eval_generate_and_resume_from_the_cli(quickstart_run, tmp_path):
    out, _ = quickstart_run
    run_dir = out / "run"
    proc = bigtrain("eval", run_dir, "--max-batches", 2)
    assert proc.returncode == 0, proc.stderr
    assert "perplexity" in proc.stdout and f"over {2 * 16 * 256:,} tokens" in proc.stdout
    loss, ppl = map(float, re.search(r"loss ([\d.]+), perplexity ([\d.]+)", proc.stdout).groups())
    assert ppl == pytest.approx(math.exp(loss), rel=1e-3)

    def generate(*options):
        proc = bigtrain("generate", run_dir, "--prompt", "def ", "--max-new-tokens", 16, *options)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("def ") and proc.stdout.endswith("\n")
        return proc.stdout[len("def "):-1]  # the generated text alone

    greedy = generate("--temperature", 0)
    assert greedy.strip(), "nothing generated after the prompt"
    assert generate("--temperature", 0) == greedy  # greedy decoding is deterministic
    sampled = generate("--temperature", 1, "--seed", 1)
    assert sampled.strip() and generate("--temperature", 1, "--seed", 1) == sampled  # seeded sampling repeats
    assert generate("--temperature", 1, "--seed", 2) != sampled  # and another seed samples other text

    step = int((run_dir / "checkpoints" / "latest").read_text().strip().split("-")[1])
    proc = bigtrain("train", run_dir / "config.yaml", "run.resume=auto", f"train.steps={step + 3}",
                    "train.max_minutes=null", "log.every=1", "eval.val_every=1000")
    assert proc.returncode == 0, proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step-{step + 3:07d}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # three train records, then validation, the quickstart's task evaluation (eval.tasks), then the save
    assert [r["step"] for r in records[-6:]] == [step + 1, step + 2, step + 3, step + 3, step + 3, step + 3]
    assert "val_loss" in records[-3] and "eval/python_next_line/acc" in records[-2]
    assert records[-1]["checkpoint"] == f"step-{step + 3:07d}"


def test_info_counts_7b_without_allocating():
    proc = bigtrain("info", CONFIGS / "7b.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "parameters   6,738,415,616 (6.74B)" in proc.stdout
    assert "FLOPs/token" in proc.stdout


def test_bad_input_gives_one_clear_line(tmp_path, quickstart_run):
    out, _ = quickstart_run
    one_line_error(bigtrain("train", tmp_path / "missing.yaml"), "config file not found", "missing.yaml")
    one_line_error(bigtrain("train", CONFIGS / "tiny.yaml", "train.lrr=1"), "unknown config key train.lrr", "train.lr")
    one_line_error(bigtrain("train", CONFIGS / "tiny.yaml", "train.steps=abc"), "train.steps must be int")
    one_line_error(bigtrain("train", CONFIGS / "tiny.yaml", f"data.path={tmp_path / 'nodata'}"),
                   "data directory not found", "nodata")
    one_line_error(bigtrain("train", CONFIGS / "tiny.yaml", "parallel.engine=deepspeed", "parallel.tp=3"),
                   "world size 1 is not divisible by parallel.tp × parallel.pp × parallel.sp = 3")
    one_line_error(bigtrain("eval", tmp_path / "nockpt"), "checkpoint not found", "nockpt")
    one_line_error(bigtrain("generate", tmp_path / "nockpt", "--prompt", "x"), "checkpoint not found")

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    tokenizer = out / "data" / "tokenizer.json"
    one_line_error(bigtrain("prepare", "--input", empty, "--tokenizer", tokenizer, "--out", tmp_path / "p"), "no text found")
    assert not (tmp_path / "p").exists()


def test_existing_data_and_checkpoints_are_never_overwritten(quickstart_run):
    out, _ = quickstart_run
    manifest = (out / "data" / "train" / "manifest.json").read_bytes()
    corpus = out / "data" / "corpus" / "train.jsonl"
    one_line_error(bigtrain("prepare", "--input", corpus, "--tokenizer", out / "data" / "tokenizer.json",
                            "--out", out / "data" / "train"), "already holds a prepared dataset")
    assert (out / "data" / "train" / "manifest.json").read_bytes() == manifest

    checkpoints = sorted(p.name for p in (out / "run" / "checkpoints").iterdir())
    one_line_error(bigtrain("train", out / "run" / "config.yaml", "run.resume=null"), "already has checkpoints", "run.resume=auto")
    one_line_error(bigtrain("quickstart", "--out", out, "--minutes", 0.1), "already holds a quickstart run")
    assert sorted(p.name for p in (out / "run" / "checkpoints").iterdir()) == checkpoints


def test_cli_reports_an_out_of_range_value_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(CONFIGS / "tiny.yaml"), "train.lr=-1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["bigtrain: error: train.lr=-1.0 must be > 0"]


def test_cli_refuses_fp8_on_cpu_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(CONFIGS / "tiny.yaml"), "train.precision=fp8",
                           "train.device=cpu", f"run.dir={tmp_path / 'run'}", f"data.path={tmp_path / 'nodata'}"],
                          capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("bigtrain: error: train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9")
    assert not (tmp_path / "run").exists()
