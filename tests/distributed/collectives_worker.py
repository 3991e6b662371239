"""Run under torchrun (2 ranks): counts the collectives each training step issues from bigtrain's
own code (not DeepSpeed's) and writes them, per step, into OUT/collectives-<layout>.json (rank 0)."""

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.train import loop

config_path, out = sys.argv[1], Path(sys.argv[2])
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "barrier", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter")
step = 0
ours: Counter = Counter()  # step → collectives called by bigtrain itself


def issued_by_bigtrain() -> bool:
    """The innermost frame outside torch.distributed decides: bigtrain's code or DeepSpeed's."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" in frame.filename:
            continue
        return "/bigtrain/" in frame.filename
    return False


def counting(name, function):
    def wrapper(*args, **kwargs):
        if issued_by_bigtrain():
            ours[step] += 1
        return function(*args, **kwargs)
    return wrapper


for name in COLLECTIVES:
    setattr(dist, name, counting(name, getattr(dist, name)))
train_step = loop.Trainer.train_step


def numbered_step(self):
    global step
    step = self.step + 1
    return train_step(self)


loop.Trainer.train_step = numbered_step
for layout, overrides in {"zero2": ["parallel.zero_stage=2", "data.micro_batch=4"],
                          "pp2": ["parallel.pp=2", "data.micro_batch=4", "train.grad_accum=2"]}.items():
    ours.clear()
    step = 0
    cfg = load_config(config_path, [f"run.dir={out / layout}", "parallel.engine=deepspeed", *overrides])
    result = loop.train(cfg, console=False)
    if dist.get_rank() == 0:
        (out / f"collectives-{layout}.json").write_text(json.dumps({"per_step": ours, "losses": result.losses}))
