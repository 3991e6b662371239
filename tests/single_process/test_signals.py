"""Preemption in one process: SIGUSR1/SIGTERM → checkpoint at the next logging step (the loop checks
for signals, a collective under DeepSpeed, only there), handlers restored, exact resume."""

import json
import os
import signal

import pytest

from bigtrain.checkpoint import io as ckpt
from bigtrain.train import loop
from bigtrain.train.loop import train
from tests.helpers import tiny_config


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

        def save_under_fire(directory, writes):
            os.kill(os.getpid(), signal.SIGTERM)  # would kill the process without the handler
            save(directory, writes)
            os.kill(os.getpid(), signal.SIGUSR1)

        engine.train_step, engine.save = step, save_under_fire
        return engine

    monkeypatch.setattr(loop, "build_engine", build_engine)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_signal_saves_at_the_next_logging_step_and_resume_is_exact(async_save, stdlib_data, tmp_path, monkeypatch):
    """With `checkpoint.async` the preemption save is complete when `train` returns."""
    straight = train(tiny_config(stdlib_data, tmp_path / "straight", steps=6, val_every=1000), console=False)

    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=6, val_every=1000)
    cfg.checkpoint.async_save = async_save
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
