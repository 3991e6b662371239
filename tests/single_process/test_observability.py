"""Metrics of a real run: the step-time split (a sleep injected into data fetching is found in the
data phase), MFU from the override, and W&B (offline) holding the same values as metrics.jsonl,
with the run id carried through a resume."""

import json
import time

import pytest

from bigtrain.config import from_dict
from bigtrain.data.prefetch import Prefetcher
from bigtrain.model import flops_per_token
from bigtrain.train.loop import train
from tests.wandb_records import history, run_info

PEAK_TFLOPS = 0.5
DATA_SLEEP_S = 0.05  # injected into every data fetch


def config(data, run_dir, steps):
    return from_dict({
        "run": {"name": "obs", "dir": str(run_dir), "seed": 3, "resume": "auto"},
        "model": {"vocab_size": 512, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
        "data": {"path": str(data[0]), "val_path": str(data[1]), "seq_len": 32, "micro_batch": 4},
        "train": {"steps": steps, "warmup_steps": 1, "device": "cpu", "z_loss": 1e-4},
        "eval": {"val_every": 3, "val_batches": 2},
        "checkpoint": {"every": 3},
        "log": {"every": 2, "peak_tflops": PEAK_TFLOPS,
                "wandb": {"mode": "offline", "project": "obs-test", "group": "g", "tags": ["a", "b"]}},
    })


def wandb_files(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def run(stdlib_data, tmp_path_factory):
    """A 6-step run whose every data fetch sleeps `DATA_SLEEP_S` (a known share of the step time)."""
    run_dir = tmp_path_factory.mktemp("obs") / "run"
    cfg = config(stdlib_data, run_dir, steps=6)
    fetch = Prefetcher.next_step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Prefetcher, "next_step", lambda self: (time.sleep(DATA_SLEEP_S), fetch(self))[1])
        train(cfg, console=False)
    return cfg, run_dir


def test_step_records_hold_split_speed_and_mfu(run):
    cfg, run_dir = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6]
    per_token = flops_per_token(cfg.model, 32)
    for r in steps:
        assert r["tokens"] == r["step"] * 4 * 32
        assert r["tokens_per_s"] == pytest.approx(4 * 32 / r["step_time_s"])
        assert r["tokens_per_s_per_device"] == r["tokens_per_s"]  # one device
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * per_token / (PEAK_TFLOPS * 1e12))
        phases = [r[f"time_{p}_s"] for p in ("data", "forward", "backward", "optimizer")]
        assert all(t > 0 for t in phases)
        # the phases are measured inside the step, never more than it; the data phase holds the sleep
        assert DATA_SLEEP_S <= r["time_data_s"] <= sum(phases) <= r["step_time_s"] * 1.001
        assert r["skipped_steps"] == r["fp16_overflow_steps"] == 0 and r["loss_scale"] is None and r["peak_mem_gb"] > 0.1
        assert 1e-4 * 5**2 < r["z_loss"] < 1e-4 * 8**2  # log Z near log 512 = 6.2 at the start; in W&B below too
    saves = [r for r in records if "checkpoint_write_s" in r]
    assert [r["checkpoint"] for r in saves] == ["step-0000003", "step-0000006"]
    on_disk = sum(f.stat().st_size for f in (run_dir / "checkpoints" / "step-0000006").rglob("*") if f.is_file())
    assert saves[-1]["checkpoint_gb"] == pytest.approx(on_disk / 2**30)
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]


def test_wandb_history_equals_metrics_jsonl(run):
    cfg, run_dir = run
    (file,) = wandb_files(run_dir)
    rows = {row["_step"]: row for row in history(file)}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    compared = 0
    for record in records:
        row = rows[record["step"]]
        for key, value in record.items():
            if key != "step" and value is not None:
                expected = value if isinstance(value, str) else pytest.approx(value, rel=1e-12)
                assert row[key] == expected, (record["step"], key)
                compared += 1
    assert compared >= 50  # 3 step, 3 validation and 2 checkpoint records
    info = run_info(file)
    assert info["config"]["model"]["d_model"] == 32 and info["config"]["log"]["wandb"]["tags"] == ["a", "b"]
    state = json.loads((run_dir / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["wandb_run_id"] == info["id"]


def test_resumed_run_continues_the_same_wandb_run(run, stdlib_data):
    cfg, run_dir = run
    first_id = run_info(wandb_files(run_dir)[0])["id"]
    train(config(stdlib_data, run_dir, steps=8), console=False)  # run.resume=auto: from step 6
    files = wandb_files(run_dir)
    assert len(files) == 2
    resumed = run_info(files[1])
    assert resumed["id"] == first_id
    assert [row["_step"] for row in history(files[1]) if "loss" in row] == [8]
