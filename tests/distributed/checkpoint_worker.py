"""Run under torchrun (2 ranks): exact resume for ZeRO 1/2/3, a refused malicious DeepSpeed file,
and a NaN injected into a step. Rank 0 writes results.json into OUT for test_checkpoints.py."""

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bigtrain.config import load_config
from bigtrain.errors import BigtrainError
from bigtrain.train import loop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.helpers
from tests.helpers import poisoned  # noqa: E402

config_path, out = sys.argv[1], Path(sys.argv[2])
N = 3


class Evil:
    def __reduce__(self):
        return open, (str(out / "pwned"), "w")


def run(name, *overrides):
    cfg = load_config(config_path, [f"run.dir={out / name}", "parallel.engine=deepspeed", *overrides])
    try:
        return loop.train(cfg, console=False).losses
    except BigtrainError as e:
        return str(e)


def poison(steps):
    """Make the model's output NaN during the given (1-based) training steps; returns the undo."""
    build = loop.build_engine
    loop.build_engine = poisoned(build, steps)
    return lambda: setattr(loop, "build_engine", build)


results = {}
for stage in (1, 2, 3):
    zero = f"parallel.zero_stage={stage}"
    straight = run(f"z{stage}", zero, f"train.steps={2 * N}", f"checkpoint.every={N}")
    resumed = run(f"z{stage}-resumed", zero, f"train.steps={2 * N}",
                  f"run.resume={out / f'z{stage}' / 'checkpoints' / f'step-{N:07d}'}")
    results[f"zero{stage}"] = {"straight": straight, "resumed": resumed}

evil = out / "evil"
if dist.get_rank() == 0:
    shutil.copytree(out / "z2" / "checkpoints" / f"step-{N:07d}", evil)
    optim = evil / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(optim, weights_only=False)
    state["optimizer_state_dict"]["payload"] = Evil()
    torch.save(state, optim)  # pickles Evil by its __reduce__: unpickling would call open()
    sizes = json.loads((evil / "files.json").read_text())  # a forger fixes up the list of sizes too
    sizes[str(optim.relative_to(evil))] = optim.stat().st_size
    (evil / "files.json").write_text(json.dumps(sizes))
dist.barrier()
results["evil"] = run("evil-run", "parallel.zero_stage=2", f"train.steps={2 * N}", f"run.resume={evil}")
results["pwned"] = (out / "pwned").exists()

for stage in (0, 2):
    restore = poison({2})
    results[f"nan-zero{stage}"] = run(f"nan{stage}", f"parallel.zero_stage={stage}", f"train.steps={N}")
    restore()
    records = [json.loads(line) for line in (out / f"nan{stage}" / "metrics.jsonl").read_text().splitlines()]
    results[f"nan-zero{stage}-skipped"] = [r["skipped_steps"] for r in records if "loss" in r]

if dist.get_rank() == 0:
    (out / "results.json").write_text(json.dumps(results))
