"""Preemption of `bigtrain train` as a subprocess: SIGTERM → checkpoint and exit code 75; a signal
before training starts ends the process at once with one line."""

import signal
import subprocess
import sys
import time

import yaml

from bigtrain.checkpoint import io as ckpt
from bigtrain.train.signals import PREEMPTED_EXIT_CODE
from tests.helpers import tiny_config


def start_training(stdlib_data, tmp_path, log_every: int) -> tuple[subprocess.Popen, object]:
    """`bigtrain train` of an endless tiny run, started: (the process, its run directory)."""
    run_dir = tmp_path / "run"
    cfg = tiny_config(stdlib_data, run_dir, steps=100_000, val_every=100_000)
    cfg.log.every = log_every
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(tmp_path / "config.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, run_dir


def test_cli_exits_with_the_preemption_code(stdlib_data, tmp_path):
    proc, run_dir = start_training(stdlib_data, tmp_path, log_every=1)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, err
    step = int(ckpt.latest_checkpoint(run_dir).name.removeprefix("step-"))
    assert 2 <= step < 100_000
    assert out.splitlines()[-1] == (f"preempted at step {step}: saved {run_dir}/checkpoints/step-{step:07d}; "
                                    "exiting with 75 (continue with run.resume=auto)")
    assert "bigtrain: received SIGTERM; will checkpoint at the next logging step and stop" in err


def catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status)."""
    status = open(f"/proc/{pid}/status").read()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


def test_a_signal_before_training_ends_the_process_at_once(stdlib_data, tmp_path):
    """A preemption notice that arrives while `bigtrain train` is still importing torch ends it at
    once with one line and the preemption code: there is nothing to save yet, and nothing is written."""
    proc, run_dir = start_training(stdlib_data, tmp_path, log_every=2)
    deadline = time.monotonic() + 60
    while not catches(proc.pid, signal.SIGUSR1):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGUSR1)
    assert "libtorch" not in open(f"/proc/{proc.pid}/maps").read()  # the handler came before torch
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert err == "bigtrain: received SIGUSR1 before training started; exiting (nothing to save)\n"
    assert not run_dir.exists()
