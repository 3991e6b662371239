"""The GPU check that fits a short lent slot: the most valuable measurements first, each side in a
process of its own with a time budget, every result saved the moment it ends, and a clean stop
before `--budget` seconds (default 8 minutes) so that one 10-minute command holds all of it.

    tools/bench/device_check.sh                      # on the GPU machine (installs the carried wheels)
    python tools/bench/device_check.py --dry-run     # anywhere: the sides, their budgets, their commands

Sides, in order of value: bigtrain compiled 1b, HF 1b, bigtrain compiled 125m, the one-step kernel
table of 125m (which attention kernel ran; no fp32 GEMM), DeepSpeed ZeRO-1 compiled 1b, fp8 1b
(compiled), and a 50-step bf16 vs fp32 loss curve of 125m. Eager sides are eager
(`train.compile=false`); compiled sides fail on any recompilation or graph break. A side is
started only when its whole budget still fits before the deadline.

Writes into `--out` (default `$OUT`, else `device-check/`): `results.jsonl` (the versions record,
then one record per side, as each ends), `stderr.log` (every side's full stderr, with a header)
and `kernels.txt` (the profiler's table).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "configs"
COMPILE_PROBLEMS = re.compile(r"Recompiling function|Graph break", re.IGNORECASE)
GRAD_ACCUM = {"125m": 2, "1b": 4}  # 64k tokens a step (1b: 4 × 4 × 4096), as a user would train them
CURVE_TAIL, CURVE_GOAL = 20, 0.02  # bf16's mean loss over the last steps within 2 % of fp32's


@dataclass(frozen=True)
class Side:
    name: str
    budget_s: int
    args: list[str]  # a script of this folder and its arguments

    @property
    def compiled(self) -> bool:
        return any("compile=true" in a for a in self.args)


def step(model: str, side: str) -> list[str]:
    return ["bench_step.py", "--config", str(CONFIGS / f"{model}.yaml"), "--device", "cuda", "--sides", side,
            "--grad-accum", str(GRAD_ACCUM[model]), "--steps", "3", "--repeats", "2", "--warmup", "2"]


SIDES = [
    Side("bigtrain-1b-compiled", 120, step("1b", "bigtrain,train.compile=true")),
    Side("hf-1b", 75, step("1b", "hf")),
    Side("bigtrain-125m-compiled", 75, step("125m", "bigtrain,train.compile=true")),
    Side("kernels-125m-compiled", 60, ["kernel_table.py", "--config", str(CONFIGS / "125m.yaml"), "train.compile=true"]),
    Side("master-weights-1b-compiled", 90, step("1b", "bigtrain,train.compile=true,train.master_weights=true")),
    Side("deepspeed-zero1-1b-compiled", 120, step("1b", "deepspeed,train.compile=true")),
    Side("fp8-1b-compiled", 100, step("1b", "bigtrain,train.precision=fp8,train.compile=true")),
    Side("curve-125m-bf16", 50, ["loss_curve.py", "--config", str(CONFIGS / "125m.yaml"), "--precision", "bf16",
                                 "--steps", "50"]),
    Side("curve-125m-fp32", 60, ["loss_curve.py", "--config", str(CONFIGS / "125m.yaml"), "--precision", "fp32",
                                 "--steps", "50"]),
]


def versions() -> dict:
    """Device and library versions (a missing library is `null`)."""
    import torch

    found = {}
    for package in ("torch", "transformers", "deepspeed", "torchao", "pydantic", "pydantic-core"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    cuda = torch.cuda.is_available()
    return {"bench": "device-check-versions", **found, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu", "python": sys.version.split()[0]}


def run(side: Side, timeout_s: float, out: Path, device: dict) -> dict:
    """One side in a process of its own: its JSON record(s) with the device and versions, or why
    it has none; its stderr appended to stderr.log; the kernel table to kernels.txt."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **({"TORCH_LOGS": "recompiles,graph_breaks"} if side.compiled else {})}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, str(HERE / side.args[0]), *side.args[1:]], capture_output=True,
                              text=True, timeout=timeout_s, env=env, cwd=HERE)
        stdout, stderr, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        stdout, stderr, code = _text(e.stdout), _text(e.stderr), None
    seconds = round(time.monotonic() - started, 1)
    with open(out / "stderr.log", "a") as log:
        log.write(f"===== {side.name} (exit {code}, {seconds} s) =====\n{stderr}\n")
    if side.name.startswith("kernels"):
        (out / "kernels.txt").write_text(stdout)
    records = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    result = {"bench": "device-check", "side": side.name, "seconds": seconds, "device": device["device"],
              "versions": {k: device[k] for k in ("torch", "transformers", "deepspeed", "cuda", "cudnn")},
              "records": records}
    if code is None:
        result["error"] = f"timed out after {timeout_s:.0f} s"
    elif code:
        result["error"] = (stderr.strip().splitlines() or ["(no stderr)"])[-1][:500]
    elif side.compiled and COMPILE_PROBLEMS.search(stderr):
        result["error"] = f"{len(COMPILE_PROBLEMS.findall(stderr))} recompilation(s) or graph break(s): see stderr.log"
    return result


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all sides (default 8 minutes)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-check")))
    parser.add_argument("--only", nargs="+", help="run only these sides (names as --dry-run lists them)")
    parser.add_argument("--dry-run", action="store_true", help="list the sides, their budgets and commands")
    args = parser.parse_args()
    sides = [s for s in SIDES if not args.only or s.name in args.only]
    if args.dry_run:
        for side in sides:
            print(f"{side.name:<30} {side.budget_s:>4} s  {' '.join(side.args)}")
        print(f"{'total':<30} {sum(s.budget_s for s in sides):>4} s  (budget {args.budget:.0f} s: sides that no "
              "longer fit are skipped)")
        return
    deadline = time.monotonic() + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    device = versions()
    results = args.out / "results.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps(device) + "\n")
    print(json.dumps(device), flush=True)
    curves = {}
    for side in sides:
        left = deadline - time.monotonic()
        if left < side.budget_s:
            result = {"bench": "device-check", "side": side.name, "skipped": f"{left:.0f} s left of the budget"}
        else:
            result = run(side, side.budget_s, args.out, device)
        losses = [r["losses"] for r in result.get("records", []) if "losses" in r]
        if side.name.startswith("curve-") and losses and "error" not in result:
            curves[side.name.rsplit("-", 1)[1]] = sum(losses[0][-CURVE_TAIL:]) / len(losses[0][-CURVE_TAIL:])
        for record in (result, *([compare(curves)] if len(curves) == 2 and side.name.startswith("curve-") else [])):
            with open(results, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def compare(curves: dict[str, float]) -> dict:
    """bf16's loss curve against fp32's: the mean loss over their last steps."""
    ratio = curves["bf16"] / curves["fp32"] - 1
    return {"bench": "device-check", "side": "curve-125m-bf16-vs-fp32", "bf16_tail_loss": round(curves["bf16"], 4),
            "fp32_tail_loss": round(curves["fp32"], 4), "bf16_vs_fp32": round(ratio, 4),
            "within_goal": abs(ratio) <= CURVE_GOAL}


if __name__ == "__main__":
    main()
