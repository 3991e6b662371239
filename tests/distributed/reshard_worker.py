"""Run under torchrun (2 ranks): checkpoints resumed under another layout, after `bigtrain convert
reshard` (run by rank 0 through the CLI) or directly from the single-process layout. Rank 0 writes
results.json into OUT for test_reshard.py.

argv: CONFIG OUT LOCAL_CHECKPOINT WARMUP_CHECKPOINT (single-process checkpoints after N of the config's
2N steps, the second of a run with a sequence-length warmup)
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch.distributed as dist

from bigtrain.cli import main
from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.train import loop

config_path, out, local_checkpoint, warmup_checkpoint = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
N = 3
TP2 = ("parallel.engine=deepspeed", "parallel.tp=2", "data.micro_batch=8")
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)  # for the barriers


def run(config, name, *overrides):
    cfg = load_config(config, [f"run.dir={out / name}", *overrides])
    try:
        return loop.train(cfg, console=False).losses
    except BigtrainError as e:
        return str(e)


def reshard_and_resume(checkpoint, name, *layout):
    """Rank 0 reshards `checkpoint` to `layout`; then every rank resumes it under that layout."""
    if dist.get_rank() == 0:
        assert main(["convert", "reshard", str(checkpoint), str(out / name), "parallel.engine=deepspeed", *layout]) == 0
    dist.barrier()
    return run(out / name / "config.yaml", f"{name}-run", f"run.resume={out / name}")


results = {
    "local-to-dp2-zero2": reshard_and_resume(local_checkpoint, "dp2-zero2", "parallel.zero_stage=2",
                                             "data.micro_batch=4"),
    "warmup-local-to-dp2-zero2": reshard_and_resume(warmup_checkpoint, "warmup-dp2-zero2", "parallel.zero_stage=2",
                                                    "data.micro_batch=4"),
    "local-resumed-as-tp2": run(config_path, "tp2-from-local", *TP2, f"run.resume={local_checkpoint}"),
    "tp2": run(config_path, "tp2", *TP2),
}
tp2_checkpoint = out / "tp2" / "checkpoints" / f"step-{N:07d}"
results["tp2-to-pp2-zero1"] = reshard_and_resume(tp2_checkpoint, "pp2-zero1", "parallel.tp=1", "parallel.pp=2",
                                                 "parallel.zero_stage=1", "data.micro_batch=4", "train.grad_accum=2")
results["tp2-to-dp2-zero3"] = reshard_and_resume(tp2_checkpoint, "dp2-zero3", "parallel.tp=1",
                                                 "parallel.zero_stage=3", "data.micro_batch=4")
results["tp2-resumed-as-pp2"] = run(config_path, "tp2-as-pp2", "parallel.engine=deepspeed", "parallel.pp=2",
                                    "data.micro_batch=4", "train.grad_accum=2", f"run.resume={tp2_checkpoint}")
if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results))
