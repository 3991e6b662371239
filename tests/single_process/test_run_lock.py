"""One writer per run directory: a second launch is refused in one line naming the holder, waits
for it with --wait-lock, and the kernel releases the lock of a holder killed with kill -9."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from bigtrain.cli import main
from bigtrain.errors import BigtrainError
from bigtrain.train.run_lock import RunLock
from tests.helpers import tiny_config

HOLDER = """
import sys, time
from bigtrain.train.run_lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def hold(run_dir, seconds) -> subprocess.Popen:
    """A process that takes the lock of `run_dir` and keeps it for `seconds` (or until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_file_names_the_holder(tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    try:
        info = json.loads((tmp_path / "run" / ".lock").read_text())
        assert (info["pid"], info["host"]) == (os.getpid(), socket.gethostname())
        assert "started" in info and "job_id" in info
    finally:
        lock.release()
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_second_holder_is_refused_and_kill_minus_nine_releases(tmp_path):
    holder = hold(tmp_path / "run", 600)
    try:
        with pytest.raises(BigtrainError) as error:
            RunLock(tmp_path / "run").acquire()
        message = str(error.value)
        assert message.startswith(f"{tmp_path / 'run'} is in use by pid {holder.pid} on {socket.gethostname()}")
        assert "--wait-lock" in message and "\n" not in message
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    RunLock(tmp_path / "run").acquire().release()  # the kernel let go of the dead holder's lock


def test_wait_lock_waits_for_the_holder(tmp_path):
    started = time.monotonic()  # before the holder takes the lock, which it then keeps 1.5 s
    holder = hold(tmp_path / "run", 1.5)
    lock = RunLock(tmp_path / "run").acquire(wait_s=60)
    waited = time.monotonic() - started
    lock.release()
    holder.wait()
    assert 1.5 <= waited < 30


def test_train_refuses_a_locked_run_directory_and_changes_nothing(stdlib_data, tmp_path, capsys):
    cfg = tiny_config(stdlib_data, tmp_path / "run", validate=False, verify_checksums=False, steps=2, val_every=1000)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    holder = hold(tmp_path / "run", 600)
    try:
        assert main(["train", str(tmp_path / "config.yaml"), "run.resume=auto"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"bigtrain: error: {tmp_path / 'run'} is in use by pid {holder.pid}")
        assert len(err.splitlines()) == 1
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written
        assert main(["train", str(tmp_path / "config.yaml"), "run.lock=false", "run.dir=" + str(tmp_path / "other")]) == 0
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert main(["train", str(tmp_path / "config.yaml"), "run.resume=auto", "--wait-lock", "5"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000002"
