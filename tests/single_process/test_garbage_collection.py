"""`train.manual_gc`: Python's automatic garbage collection is off during the steps, a generation-1
collection runs at each logging step, and the collector is back on when `train()` returns (also
after a failure), so a process that trains again is left as it was."""

import gc

import pytest

from bigtrain.train.callbacks import Callback
from bigtrain.train.loop import train
from tests.helpers import tiny_config


class Watch(Callback):
    """Records, per step, whether automatic GC is on, and every collection with its generation."""

    def __init__(self, fail_at: int | None = None):
        self.enabled, self.collections, self.fail_at, self.ended = [], [], fail_at, False

    def start(self, run):
        gc.callbacks.append(self.seen)

    def seen(self, phase, info):
        if phase == "start" and not self.ended:
            self.collections.append((self.step, info["generation"]))

    def step_end(self, run, out):
        self.step = run.step
        self.enabled.append(gc.isenabled())
        if run.step == self.fail_at:
            raise RuntimeError("a failing step")

    def end(self, run):
        self.ended = True  # (once train() restores the collector, automatic collections run again)

    def close(self):
        gc.callbacks.remove(self.seen)


@pytest.mark.parametrize("manual", [True, False])
def test_automatic_gc_off_during_steps_collected_at_logging_steps(stdlib_data, tmp_path, manual):
    assert gc.isenabled()
    watch = Watch()
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=6, validate=False, manual_gc=manual)
    cfg.log.every = 3
    train(cfg, console=False, callbacks=[watch])
    assert gc.isenabled()  # back on once train() returns
    if manual:
        assert watch.enabled == [False] * 6
        assert watch.collections == [(3, 1), (6, 1)]  # one generation-1 collection per logging step, no other
    else:
        assert watch.enabled == [True] * 6


def test_gc_back_on_after_a_failed_run(stdlib_data, tmp_path):
    cfg = tiny_config(stdlib_data, tmp_path / "run", steps=6, validate=False)
    with pytest.raises(RuntimeError, match="a failing step"):
        train(cfg, console=False, callbacks=[Watch(fail_at=2)])
    assert gc.isenabled()
