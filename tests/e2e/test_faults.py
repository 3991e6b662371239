"""kill -9 at several moments — during a step, in the middle of writing a checkpoint, right after
one — then resume: `latest` always names a complete checkpoint, no more than the steps since the
last save are lost, and the stitched loss curve equals an uninterrupted run's bit for bit."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from bigtrain.checkpoint.io import latest_checkpoint, open_checkpoint
from bigtrain.config import from_dict
from bigtrain.train.loop import train
from tests.helpers import tiny_config

STEPS, EVERY = 12, 3
# The trainer, with every fsync slowed down (as on a busy network filesystem), so a kill can land
# in the middle of writing a checkpoint.
TRAINER = """
import sys, time
import bigtrain.checkpoint.files as checkpoint
fsync = checkpoint.fsync_path
checkpoint.fsync_path = lambda path: (time.sleep(0.03), fsync(path))
from bigtrain.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


def logged_steps(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "loss" in r]


def wait_for(condition, proc, timeout=120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_kill_minus_nine_at_any_moment_loses_at_most_the_unsaved_steps(async_save, stdlib_data, tmp_path):
    """With `checkpoint.async` the kills "while writing" land while the background thread writes
    and training goes on; the stitched curve is compared with a synchronous straight run."""
    cfg = tiny_config(stdlib_data, tmp_path / "run", validate=False, verify_checksums=False, steps=STEPS, val_every=1000)
    cfg.checkpoint.every, cfg.log.every, cfg.run.resume = EVERY, 1, "auto"
    cfg.checkpoint.async_save = async_save
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    run_dir, root = tmp_path / "run", tmp_path / "run" / "checkpoints"

    def saving() -> bool:
        return any(p.name.startswith(".tmp-step-") for p in root.glob(".tmp-*"))

    def saved_after(step):
        return lambda: (latest_checkpoint(run_dir) or root).name > f"step-{step:07d}"

    moments = {
        "during a step": lambda: bool(logged_steps(run_dir)) and logged_steps(run_dir)[-1]["step"] >= 1,
        "while writing a checkpoint": saving,
        "right after a checkpoint": saved_after(0),
        "while writing the next checkpoint": saving,
    }
    hits = []
    for moment, condition in moments.items():
        before = latest_checkpoint(run_dir)
        proc = subprocess.Popen([sys.executable, "-c", TRAINER, str(tmp_path / "config.yaml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if moment == "while writing the next checkpoint":
            wait_for(saved_after(int(before.name[5:])), proc)  # the next save, not the resumed one
        hit = wait_for(condition, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        hits.append(hit and saving() if "writing" in moment else hit)
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            open_checkpoint(latest)  # complete: every file there with the size it was written with
            assert json.loads((latest / "state.json").read_text())["step"] % EVERY == 0
        last_logged = logged_steps(run_dir)[-1]["step"] if logged_steps(run_dir) else 0
        saved = int(latest.name[5:]) if latest else 0
        assert last_logged - saved <= EVERY, moment  # at most the steps since the last save are lost
        assert before is None or saved >= int(before.name[5:])
    assert hits == [True, True, True, True]  # each kill landed where it was meant to

    proc = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "config.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not list(root.glob(".tmp-*"))  # each interrupted save was redone by a resumed run
    stitched = {r["step"]: r["loss"] for r in logged_steps(run_dir)}  # later records win
    raw = cfg.to_dict()
    straight = train(from_dict({**raw, "run": {**raw["run"], "dir": str(tmp_path / "straight"), "resume": None},
                                "checkpoint": {**raw["checkpoint"], "async_save": False}}), console=False)
    assert [stitched[s] for s in range(1, STEPS + 1)] == straight.losses  # bitwise
