"""The processes of a run: this process's rank from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`),
Slurm (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) or a lone process, the rendezvous
variables, and the default process group. How the ranks are laid out in the pp × dp × sp × tp
grid is the engine's (`bigtrain/engine/deepspeed/grid.py`).
"""

from __future__ import annotations

import atexit
import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.distributed import heartbeat


@dataclass(frozen=True)
class ProcessEnv:
    rank: int
    world_size: int
    local_rank: int


def process_env() -> ProcessEnv:
    """This process's rank, world size and local rank from torchrun's or Slurm's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return ProcessEnv(0, 1, 0)


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[07-09,12],cpu1` → `gpu07`."""
    prefix, first, suffix = re.match(r"([^,\[]*)(?:\[([^\],-]*)[^\]]*\])?([^,\[]*)", nodelist).groups()
    return prefix + (first or "") + suffix


def export_rendezvous_env() -> None:
    """Fill in the torchrun-style variables torch and DeepSpeed read when only Slurm set any.

    Under plain `srun` (one task per GPU, no torchrun) rank 0 runs on the step's first node, and the
    port is derived from the job id so that every task agrees without talking and concurrent jobs
    on one node differ. Variables already set (by torchrun or the user) are kept.
    """
    env = os.environ
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "RANK" not in env:
        pe = process_env()
        env.update(RANK=str(pe.rank), WORLD_SIZE=str(pe.world_size), LOCAL_RANK=str(pe.local_rank))
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]))
        env.setdefault("MASTER_PORT", str(20000 + int(env["SLURM_JOB_ID"]) % 20000))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")


def init_processes(cfg: Config) -> None:
    """Start torch.distributed over the launched processes (once; it ends at interpreter exit) and
    this rank's heartbeat, so that the ranks can agree on everything else (the run lock, the resume
    point) before any of them reads the run directory. DeepSpeed later takes over this process
    group as it is."""
    env = process_env()
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else "nccl" if cuda else "gloo"
    if cuda:  # a task may see all of its node's GPUs or only its own
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    export_rendezvous_env()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL: a timed-out collective ends the process
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    compat.set_default_group_timeout(timeout)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    # also when the caller made the group: gloo aborts the interpreter's exit on a group left alive
    atexit.unregister(end_processes)
    atexit.register(end_processes)
    heartbeat.start(env.rank, env.world_size)


def end_processes() -> None:
    """Stop the heartbeat and the process group's backend threads (at interpreter exit, so that a
    process may run several trainings in one process group)."""
    heartbeat.stop()
    if dist.is_initialized():
        dist.destroy_process_group()
