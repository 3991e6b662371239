"""MFU, tokens/s and peak memory of the 125m, 350m and 1b configs on one CUDA GPU in bf16: the
local engine and DeepSpeed ZeRO-1 (each eager and with `train.compile=true`) vs HF
`LlamaForCausalLM` with sdpa attention, on the same shapes.

    python tools/bench/bench_gpu.py [--models 125m 350m 1b] [--steps 10] [--repeats 3]

Each (model, side) runs `bench_step.py` in a process of its own, so its peak memory is its own
and nothing else holds GPU memory; a dedicated GPU needs no interleaving. Prints one JSON line
per model (the `step` records of its sides merged), then the table rows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import measure

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "configs"
SIDES = ["hf", "bigtrain", "bigtrain,train.compile=true", "deepspeed", "deepspeed,train.compile=true"]
SHAPES = {"125m": (16, 2), "350m": (8, 2), "1b": (4, 2)}  # micro-batch, grad-accum at the config's seq_len


def run_model(name: str, sides: list[str], steps: int, repeats: int) -> dict:
    merged: dict = {}
    micro_batch, grad_accum = SHAPES.get(name, (4, 2))
    for side in sides:
        cmd = [sys.executable, str(HERE / "bench_step.py"), "--config", str(CONFIGS / f"{name}.yaml"),
               "--device", "cuda", "--sides", side, "--micro-batch", str(micro_batch),
               "--grad-accum", str(grad_accum), "--steps", str(steps), "--repeats", str(repeats), "--warmup", "3"]
        out = measure(cmd).stdout
        record = json.loads(next(line for line in out.splitlines() if line.startswith('{"bench"')))
        merged = {**record, "sides": {**merged.get("sides", {}), **record["sides"]}}
    losses = [v["first_loss"] for v in merged["sides"].values()]
    if max(losses) - min(losses) > 2e-2 * min(losses):  # same weights and batch in every process
        raise SystemExit(f"{name}: the sides' first losses differ: {losses}")
    hf = merged["sides"].get("hf")
    for values in merged["sides"].values():
        if hf:
            values["vs_hf"] = round(values["tokens_per_s"] / hf["tokens_per_s"], 3)
    merged["bench"] = "gpu"
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--sides", nargs="+", default=SIDES)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; none is visible")
    for name in args.models:
        print(json.dumps(run_model(name, args.sides, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
