"""A callback passed to `train()` runs at its points of the loop and its state rides the checkpoints."""

import json

from bigtrain.train.callbacks import Callback
from bigtrain.train.loop import train
from tests.helpers import tiny_config


class Counter(Callback):
    def __init__(self):
        self.steps, self.events = 0, []

    def load_state_dict(self, state):
        self.steps = state["counter_steps"]

    def start(self, run):
        self.events.append(("start", run.step))

    def step_end(self, run, out):
        self.steps += 1

    def metrics(self, run):
        return {"counter_steps": self.steps}

    def logged(self, run):
        self.events.append(("logged", run.step))

    def saved(self, run, checkpoint):
        self.events.append(("saved", checkpoint.name))

    def end(self, run):
        self.events.append(("end", run.step))

    def state_dict(self):
        return {"counter_steps": self.steps}


def test_a_callbacks_hooks_cadence_and_state_survive_a_resume(stdlib_data, tmp_path):
    run = tmp_path / "run"
    first = Counter()
    train(tiny_config(stdlib_data, run, steps=4, val_every=1000), console=False, callbacks=[first])
    assert first.events == [("start", 0), ("logged", 4), ("saved", "step-0000004"), ("end", 4)]
    assert json.loads((run / "checkpoints" / "step-0000004" / "state.json").read_text())["counter_steps"] == 4

    second = Counter()
    cfg = tiny_config(stdlib_data, run, steps=6, val_every=1000)
    cfg.run.resume, cfg.log.every = "auto", 1
    train(cfg, console=False, callbacks=[second])
    assert second.steps == 6  # 4 restored from the checkpoint, 2 counted here
    assert second.events == [("start", 4), ("logged", 5), ("logged", 6), ("saved", "step-0000006"), ("end", 6)]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["counter_steps"] for r in records if "loss" in r] == [4, 5, 6]
