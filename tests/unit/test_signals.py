"""Preemption: SIGUSR1/SIGTERM → checkpoint at the next logging step (the loop checks for signals,
a collective under DeepSpeed, only there), exit code 75, exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from bigtrain.checkpoint import io as ckpt
from bigtrain.train import loop
from bigtrain.train.loop import train
from bigtrain.train.signals import PREEMPTED_EXIT_CODE
from tests.unit.test_train import tiny_config


def signalling_engine(monkeypatch, at_step: int):
    """The real engine, with signals sent from inside it: SIGUSR1 during step `at_step`, then
    SIGTERM and SIGUSR1 again while the checkpoint is being written."""
    build = loop.build_engine

    def build_engine(*args, **kwargs):
        engine = build(*args, **kwargs)
        train_step, save, calls = engine.train_step, engine.save, []

        def step(*args):
            calls.append(1)
            if len(calls) == at_step:
                os.kill(os.getpid(), signal.SIGUSR1)
            return train_step(*args)

        def save_under_fire(directory):
            os.kill(os.getpid(), signal.SIGTERM)  # would kill the process without the handler
            save(directory)
            os.kill(os.getpid(), signal.SIGUSR1)

        engine.train_step, engine.save = step, save_under_fire
        return engine

    monkeypatch.setattr(loop, "build_engine", build_engine)


def test_signal_saves_at_the_next_logging_step_and_resume_is_exact(stdlib_data, tmp_path, monkeypatch):
    straight = train(tiny_config(stdlib_data, tmp_path / "straight", steps=6, eval_every=1000), console=False)

    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=6, eval_every=1000)
    cfg.log.every = 2  # the signal comes during step 3: it is honoured at step 4
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with monkeypatch.context() as patch:
        signalling_engine(patch, at_step=3)
        stopped = train(cfg, console=False)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # restored
    assert stopped.preempted and stopped.step == 4 and stopped.losses == straight.losses[:4]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert stopped.checkpoint == checkpoints / "step-0000004"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-0000004"]  # no .tmp left
    assert ckpt.read_state(stopped.checkpoint)["step"] == 4
    records = map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert [r["step"] for r in records if "loss" in r] == [2, 4]

    cfg.run.resume = "auto"
    resumed = train(cfg, console=False)
    assert not resumed.preempted and resumed.step == 6
    assert stopped.losses + resumed.losses == straight.losses  # bitwise: nothing lost, nothing repeated


def test_cli_exits_with_the_preemption_code(stdlib_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_config(stdlib_data, run_dir, steps=100_000, eval_every=100_000)
    cfg.log.every = 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(tmp_path / "config.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    run_dir = tmp_path / "run"
    cfg = tiny_config(stdlib_data, run_dir, steps=100_000, eval_every=100_000)
    cfg.log.every = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(tmp_path / "config.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
