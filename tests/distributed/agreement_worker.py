"""Run under torchrun (2 ranks, ZeRO-2): rank 1 is given a view of its own of each decision that
every rank must share, and both ranks record what they did in OUT/results-<rank>.json for
test_agreement.py.

- resume point: rank 1 reads an older `checkpoints/latest` (as while another job still writes);
- remote latest: on an empty run directory rank 1 reads an older remote `latest`;
- the ending: only rank 1 receives SIGUSR1;
- a skipped update: only rank 1's loss is NaN in step 2.
"""

import json
import os
import signal
import sys
from pathlib import Path

from bigtrain.checkpoint import io as ckpt
from bigtrain.checkpoint import mirror
from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.helpers
from tests.helpers import poisoned  # noqa: E402

config_path, out = sys.argv[1], Path(sys.argv[2])
rank = int(os.environ["RANK"])
remote = out / "remote"
skipped: list[int] = []  # this rank's count of skipped updates, per run


def run(name, *overrides):
    cfg = load_config(config_path, [f"run.dir={out / name}", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                                    "train.schedule=constant", "checkpoint.every=2", *overrides])
    try:
        result = loop.train(cfg, console=False)
    except BigtrainError as e:
        return {"error": str(e)}
    return {"losses": result.losses, "step": result.step, "preempted": result.preempted}


def on_rank1(obj, name, replacement):
    """Replace `obj.name` on rank 1 only; returns the undo."""
    original = getattr(obj, name)
    if rank == 1:
        setattr(obj, name, replacement(original))
    return lambda: setattr(obj, name, original)


def signalled_in_step_3(train_step):
    def step(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return train_step(self)
    return step


def counting(run_trainer):
    def run_and_count(self):
        result = run_trainer(self)
        skipped.append(self.bad.total())
        return result
    return run_and_count


results = {"straight": run("straight", "train.steps=6")}

run("resumed", "train.steps=4")
undo = on_rank1(ckpt, "latest_checkpoint", lambda latest: lambda run_dir: run_dir / "checkpoints" / "step-0000002")
results["resumed"] = run("resumed", "train.steps=6", "run.resume=auto")
undo()

run("mirrored", "train.steps=4", f"checkpoint.remote={remote}")
undo = on_rank1(mirror.CheckpointMirror, "remote_latest", lambda latest: lambda self: "step-0000002")
results["fetched"] = run("fetched", "train.steps=6", "run.resume=auto", f"checkpoint.remote={remote}")
undo()

undo = on_rank1(loop.Trainer, "train_step", signalled_in_step_3)
results["ending"] = run("ending", "train.steps=6", "log.every=2")
undo()

undo_poison = on_rank1(loop, "build_engine", lambda build: poisoned(build, {2}))
original_run = loop.Trainer.run
loop.Trainer.run = counting(original_run)
results["skip"] = {**run("skip", "train.steps=4"), "skipped": skipped[-1]}
undo_poison()
loop.Trainer.run = original_run

(out / f"results-{rank}.json").write_text(json.dumps(results))
