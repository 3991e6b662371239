"""MFU, tokens/s and peak memory of the 125m, 350m and 1b configs on one CUDA GPU in bf16: the
local engine and DeepSpeed ZeRO-1 (each eager and with `train.compile=true`) vs HF
`LlamaForCausalLM` with sdpa attention, on the same shapes, and each side's peak memory against
the planner's prediction (goal: within 15 %).

    python tools/bench/bench_gpu.py [--models 125m 350m 1b] [--seq-len 2048] [--tokens-per-step 65536]
                                    [--steps 10] [--repeats 3]

Each (model, side) runs `bench_step.py` in a process of its own, so its peak memory is its own
and nothing else holds GPU memory; a side that fails is reported with its error and the others
still run. Compiled sides run with `TORCH_LOGS=recompiles,graph_breaks`: any recompilation or graph
break fails that side. `--seq-len 2048` gives the 1b row llm-foundry publishes (41.8 % MFU on H100).
A step trains on `--tokens-per-step` tokens (default 65,536, what a user of one GPU would run; the
optimizer's cost is amortised over it as in training): each model's micro-batch times the gradient
accumulation that reaches it. `tools/bench/gpu_wheels.sh` prepares what a bare GPU machine lacks.
Prints one JSON line per model.

The fp8 side (`train.precision=fp8`, torchao float8 block linears, compiled) is skipped, with the
reason, where torchao is missing. Then the loss curves (`--curve-model`, default 125m; `--curve-steps
0` skips them): `loss_curve.py` trains it from the same seed on the same batches in fp32, bf16 and
fp8, each in a process of its own; the line reports each precision's tokens/s and mean loss over
the last 20 steps, and whether bf16 tracks fp32 within 2 % and fp8 tracks bf16 within 1 %.
With `--moe` (default) also `bench_moe.py` on the GPU: an 8-expert top-2 step (experts as one
`torch._grouped_mm`) vs a dense step of the same active parameters, and the dispatch's share; with
`--masking` (default) `bench_masking.py`: a document-masked step (FlexAttention) vs causal.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import torch
from common import measure

from bigtrain.config import load_config
from bigtrain.parallel import planner

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "configs"
FP8_SIDE = "bigtrain,train.precision=fp8,train.compile=true"
SIDES = ["hf", "bigtrain,train.compile=false", "bigtrain,train.compile=true", "deepspeed,train.compile=false",
         "deepspeed,train.compile=true", FP8_SIDE]  # eager sides say so: `auto` compiles on CUDA
MICRO_BATCH = {"125m": 16, "350m": 8, "1b": 4}  # at seq 2048; the step reaches --tokens-per-step by accumulation
TOKENS_PER_STEP = 65536
COMPILE_PROBLEMS = re.compile(r"Recompiling function|Graph break", re.IGNORECASE)
MEMORY_GOAL = 0.15
CURVE_GOALS = {"bf16": ("fp32", 0.02), "fp8": ("bf16", 0.01)}  # precision: (reference, relative tolerance)
CURVE_TAIL = 20  # a curve's loss: the mean of its last steps
NO_TORCHAO = "torchao is not installed (pip install 'bigtrain[fp8]')"


def predicted_gib(name: str, side: str, seq_len: int, micro_batch: int, grad_accum: int) -> float | None:
    """The planner's peak memory for this side (one GPU), or None for HF's."""
    kind = side.split(",")[0]
    if kind == "hf":
        return None
    cfg = load_config(CONFIGS / f"{name}.yaml")
    layout = planner.Layout(dp=1, zero=1 if kind == "deepspeed" else 0, micro_batch=micro_batch, grad_accum=grad_accum,
                            local=kind == "bigtrain")
    return planner.memory_plan(cfg.model, seq_len, "bf16", layout).total / 2**30


def run_side(name: str, side: str, args: argparse.Namespace) -> dict:
    if "precision=fp8" in side and importlib.util.find_spec("torchao") is None:
        return {"skipped": NO_TORCHAO}
    micro_batch = MICRO_BATCH.get(name, 4)
    seq_len = args.seq_len or load_config(CONFIGS / f"{name}.yaml").data.seq_len
    grad_accum = max(1, args.tokens_per_step // (micro_batch * seq_len))
    cmd = [sys.executable, str(HERE / "bench_step.py"), "--config", str(CONFIGS / f"{name}.yaml"),
           "--device", "cuda", "--sides", side, "--micro-batch", str(micro_batch), "--grad-accum", str(grad_accum),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--warmup", "3"]
    if args.seq_len:
        cmd += ["--seq-len", str(args.seq_len)]
    try:
        done = measure(cmd, env={"TORCH_LOGS": "recompiles,graph_breaks"} if "compile" in side else None)
    except SystemExit as e:  # one failing side does not stop the others
        return {"error": str(e).strip().splitlines()[-1][:500]}
    record = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"bench"')))
    values = record["sides"][side]
    problems = COMPILE_PROBLEMS.findall(done.stderr)
    if problems:
        values["error"] = f"{len(problems)} recompilation(s) or graph break(s); rerun with TORCH_LOGS to see them"
    predicted = predicted_gib(name, side, seq_len, micro_batch, grad_accum)
    if predicted and "peak_mem_gib" in values:
        values["planner_gib"] = round(predicted, 2)
        values["planner_error"] = round(predicted / values["peak_mem_gib"] - 1, 3)
        values["planner_within_goal"] = abs(values["planner_error"]) <= MEMORY_GOAL
    return {**values, "seq_len": seq_len, "micro_batch": micro_batch, "grad_accum": grad_accum,
            "tokens_per_step": micro_batch * grad_accum * seq_len}


def run_model(name: str, args: argparse.Namespace) -> dict:
    sides = {side: run_side(name, side, args) for side in args.sides}
    losses = [v["first_loss"] for v in sides.values() if "first_loss" in v]
    if losses and max(losses) - min(losses) > 2e-2 * min(losses):  # same weights and batch in every process
        for values in sides.values():
            values.setdefault("error", f"first losses of the sides differ: {losses}")
    hf = sides.get("hf", {}).get("tokens_per_s")
    for values in sides.values():
        if hf and "tokens_per_s" in values:
            values["vs_hf"] = round(values["tokens_per_s"] / hf, 3)
    return {"bench": "gpu", "model": name, "sides": sides}


def curve(name: str, precision: str, steps: int) -> dict:
    """`loss_curve.py` of one precision in a process of its own: tokens/s and the tail's mean loss."""
    if precision == "fp8" and importlib.util.find_spec("torchao") is None:
        return {"skipped": NO_TORCHAO}
    cmd = [sys.executable, str(HERE / "loss_curve.py"), "--config", str(CONFIGS / f"{name}.yaml"),
           "--precision", precision, "--steps", str(steps)]
    try:
        done = measure(cmd)
    except SystemExit as e:
        return {"error": str(e).strip().splitlines()[-1][:500]}
    record = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"precision"')))
    tail = record["losses"][-CURVE_TAIL:]
    return {"tokens_per_s": record["tokens_per_s"], "first_loss": record["losses"][0],
            "final_loss": round(sum(tail) / len(tail), 4)}


def run_curves(name: str, steps: int) -> dict:
    """The loss curves of `name` in fp32, bf16 and fp8, each checked against its reference."""
    curves = {precision: curve(name, precision, steps) for precision in ("fp32", "bf16", "fp8")}
    for precision, (reference, tolerance) in CURVE_GOALS.items():
        mine, ref = curves[precision].get("final_loss"), curves[reference].get("final_loss")
        if mine is not None and ref is not None:
            curves[precision][f"vs_{reference}"] = round(mine / ref - 1, 4)
            curves[precision]["within_goal"] = abs(mine / ref - 1) <= tolerance
    return {"bench": "gpu-loss-curves", "model": name, "steps": steps, "curves": curves}


def run_script(script: str, *options: str) -> dict:
    """Another benchmark of this folder on the GPU, in a process of its own: its JSON line, or the error."""
    done = subprocess.run([sys.executable, str(HERE / script), "--device", "cuda", *options], capture_output=True, text=True)
    if done.returncode:
        return {"bench": script, "error": done.stderr.strip()[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MICRO_BATCH))
    parser.add_argument("--sides", nargs="+", default=SIDES)
    parser.add_argument("--seq-len", type=int, default=None, help="default: each config's")
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP,
                        help="tokens per optimizer step: micro-batch × gradient accumulation × seq-len")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--curve-model", default="125m")
    parser.add_argument("--curve-steps", type=int, default=200)
    parser.add_argument("--masking", action=argparse.BooleanOptionalAction, default=True,
                        help="also a document-masked step (FlexAttention) vs causal (bench_masking.py)")
    parser.add_argument("--moe", action=argparse.BooleanOptionalAction, default=True,
                        help="also an 8-expert top-2 MoE step vs dense of the same active parameters (bench_moe.py)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU; none is visible")
    for name in args.models:
        print(json.dumps(run_model(name, args)), flush=True)
    if args.moe:  # experts as one torch._grouped_mm in bf16
        print(json.dumps(run_script("bench_moe.py", "--d-model", "1024", "--layers", "8", "--seq-len", "2048",
                                    "--batch", "4")), flush=True)
    if args.masking:  # FlexAttention with a document BlockMask vs the causal kernel
        print(json.dumps(run_script("bench_masking.py", "--d-model", "1024", "--layers", "8", "--seq-len", "4096",
                                    "--doc-len", "512", "--batch", "4")), flush=True)
    if args.curve_steps:
        print(json.dumps(run_curves(args.curve_model, args.curve_steps)), flush=True)


if __name__ == "__main__":
    main()
