"""Run under torchrun (2 ranks, DeepSpeed ZeRO-2): a loss spike in rank 0's data and NaN steps in
rank 1's data; a spike in the last of 2 pipeline stages (seen in the gradient norm alone). Every rank writes ranks-<rank>.json into OUT (what its gate decided and held) for
test_spikes.py."""

import json
import os
import shutil
import sys
from pathlib import Path

from bigtrain.config import load_config
from bigtrain.train import loop
from bigtrain.train.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.helpers
from tests.helpers import poisoned, poisoned_windows, step_windows  # noqa: E402

config_path, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])


class Decisions(Callback):
    """Every step's skip decision on this rank, and the gate's window at the end."""

    def __init__(self):
        self.skipped, self.window = [], None

    def step_end(self, run, out):
        self.skipped.append(bool(out.skipped))

    def end(self, run):
        self.window = run.bad.gate.state_dict()


def run(name, bad_rank, steps, factor, *overrides, skips=None, dp=2, calls=None):
    """`name`'s run with the data of the given (0-based) steps bad on rank `bad_rank` (or, with
    `calls`, that rank's model output in those training forward calls) by `factor`."""
    cfg = load_config(config_path, [f"run.dir={out / name}", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                                    "train.steps=8", *overrides])
    windows = step_windows(cfg, steps, dp_rank=rank % dp, dp_size=dp) if rank == bad_rank and steps else []
    build = loop.build_engine
    loop.build_engine = poisoned_windows(build, windows, factor)
    if calls and rank == bad_rank:
        loop.build_engine = poisoned(build, calls, factor)
    if skips and rank == 0:
        (out / name).mkdir(parents=True)
        shutil.copy(skips, out / name / "data_skips.json")
    decisions = Decisions()
    try:
        losses = loop.train(cfg, console=False, callbacks=[decisions]).losses
    finally:
        loop.build_engine = build
    return {"losses": losses, "skipped": decisions.skipped, "window": decisions.window}


results = {
    "spike": run("spike", 0, {5}, 30.0, "train.spike_window=8", "train.spike_sigma=6", "checkpoint.every=1"),
    "rollback": run("rollback", 1, {4, 5}, float("nan"), "train.rollback_after=2", "checkpoint.every=3"),
}
results["pipe"] = run("pipe", 1, set(), 30.0, "train.spike_window=8", "train.spike_sigma=6", "parallel.pp=2",
                      "parallel.zero_stage=1", "train.grad_accum=2", dp=1, calls={11, 12})  # step 6's logits × 30
results["told"] = run("told", None, set(), 1.0, "checkpoint.every=3", skips=out / "rollback" / "data_skips.json")
(out / f"ranks-{rank}.json").write_text(json.dumps(results))
