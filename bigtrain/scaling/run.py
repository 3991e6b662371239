"""Running a plan: locally one run after another (skipping finished, resuming unfinished runs), or
as one Slurm job array whose task i trains line i+1 of `runs.txt`; and the state of every run."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import bigtrain
from bigtrain.checkpoint import io as ckpt
from bigtrain.errors import BigtrainError
from bigtrain.scaling.plan import Plan, PlannedRun

REPO_ROOT = Path(bigtrain.__file__).resolve().parent.parent


@dataclass
class RunState:
    name: str
    step: int  # of the latest checkpoint; 0 without one
    steps: int

    @property
    def finished(self) -> bool:
        return self.step >= self.steps

    @property
    def label(self) -> str:
        if self.finished:
            return "done"
        return f"step {self.step}/{self.steps}" if self.step else "pending"


def run_state(run: PlannedRun) -> RunState:
    latest = ckpt.latest_checkpoint(run.config.run.path)
    step = ckpt.read_state(latest)["step"] if latest is not None and (latest / ckpt.STATE).is_file() else 0
    return RunState(run.name, step, run.config.train.steps)


def run_locally(plan: Plan) -> list[tuple[RunState, float | None]]:
    """Train every unfinished run in order (resuming from its latest checkpoint).

    Returns each run's state before this call and the wall seconds spent on it (None: skipped).
    """
    from bigtrain.train.loop import train  # imports torch: only when training

    done = []
    for i, run in enumerate(plan.runs, 1):
        state = run_state(run)
        if state.finished:
            print(f"[{i}/{len(plan.runs)}] {run.name}: finished, skipped")
            done.append((state, None))
            continue
        action = f"resuming from step {state.step}" if state.step else "starting"
        print(f"[{i}/{len(plan.runs)}] {run.name}: {action} ({run.config.train.steps} steps)", flush=True)
        run.config.run.resume = "auto"
        result = train(run.config)
        done.append((state, result.wall_s))
    return done


def sweep_script() -> Path:
    script = REPO_ROOT / "slurm" / "sweep.sbatch"
    if not script.is_file():
        raise BigtrainError(f"{script} not found: --slurm needs a bigtrain source checkout with slurm/sweep.sbatch")
    return script


def slurm_command(plan: Plan, throttle: int | None = None) -> list[str]:
    """`sbatch --array=0-(N-1)[%K] slurm/sweep.sbatch PLAN_DIR`: task i runs line i+1 of runs.txt."""
    if throttle is not None and throttle < 1:
        raise BigtrainError(f"--throttle must be at least 1, got {throttle}")
    array = f"0-{len(plan.runs) - 1}" + (f"%{throttle}" if throttle else "")
    return ["sbatch", f"--array={array}", str(sweep_script()), str(plan.out.resolve())]


def submit_to_slurm(plan: Plan, throttle: int | None = None) -> str:
    """Submit the plan as one job array; returns sbatch's reply (the job id)."""
    command = slurm_command(plan, throttle)
    if shutil.which("sbatch") is None:
        raise BigtrainError("sbatch not found on PATH: --slurm needs a Slurm login node")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise BigtrainError(f"sbatch failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    return done.stdout.strip()
