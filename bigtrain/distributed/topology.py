"""Process topology: this process's rank and its process groups in the pp × dp × sp × tp grid.

Ranks come from torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), Slurm (`SLURM_PROCID`,
`SLURM_NTASKS`, `SLURM_LOCALID`) or a lone process. The groups are DeepSpeed's own
`PipelineParallelGrid` over a `PipeModelDataParallelTopology` (tp varies fastest, so a tensor-parallel
group sits inside a node, then sp). Its data axis holds dp × sp ranks: the sequence-parallel ranks of
a replica take part in ZeRO's partitioning and gradient reduction, as DeepSpeed's
sequence-data-parallel group does. The grid is the `mpu` handed to DeepSpeed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.distributed import heartbeat
from bigtrain.distributed.device import pick_device
from bigtrain.distributed.layout import check_layout, tp_sequence_parallel

if TYPE_CHECKING:
    from bigtrain.distributed.grid import Grid


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


@dataclass
class Topology:
    """Where this process sits in the pp × dp × sp × tp grid, with its process groups."""

    env: ProcessEnv
    dp: int
    tp: int
    pp: int
    sp: int
    process_topology: object  # deepspeed PipeModelDataParallelTopology: rank ↔ (pipe, data = dp × sp, model)
    grid: Grid  # the mpu handed to deepspeed.initialize
    tp_sequence_parallel: bool = False  # the tp ranks also split the sequence (layout.tp_sequence_parallel)

    @property
    def dp_rank(self) -> int:
        """This rank's replica: which windows it reads."""
        return self.grid.replica_rank

    @property
    def sp_rank(self) -> int:
        """Which 1/sp of each window's tokens this rank holds."""
        return self.grid.sp_rank

    @property
    def tp_group(self) -> dist.ProcessGroup:
        return self.grid.get_slice_parallel_group()

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks that hold the same tokens of different windows."""
        return self.grid.replica_group

    @property
    def sp_group(self) -> dist.ProcessGroup:
        return self.grid.sp_proc_group


def init_processes(cfg: Config) -> None:
    """Start torch.distributed over the launched processes (once) and this rank's heartbeat, so
    that the ranks can agree on everything else (the run lock, the resume point) before any of them
    reads the run directory."""
    env = process_env()
    import deepspeed  # slow to import: only once the layout is known to be possible

    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    pick_device(cfg.train.device)  # refuses train.device=cuda when no GPU is visible
    if torch.cuda.is_available():  # a task may see all of its node's GPUs or only its own
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    export_rendezvous_env()
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # NCCL: a timed-out collective ends the process
    timeout = timedelta(minutes=cfg.parallel.timeout_minutes)
    compat.set_default_group_timeout(timeout)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, rank=env.rank, world_size=env.world_size,
            verbose=False, timeout=timeout,
        )
    heartbeat.start(env.rank, env.world_size)


def init_topology(cfg: Config) -> Topology:
    """Check the layout, start the processes (if not yet) and build DeepSpeed's grid of groups."""
    env = process_env()
    dp = check_layout(cfg, env.world_size)
    init_processes(cfg)
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from bigtrain.distributed.grid import Grid

    p = cfg.parallel
    topology = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=dp * p.sp)
    return Topology(env=env, dp=dp, tp=p.tp, pp=p.pp, sp=p.sp, process_topology=topology,
                    grid=Grid(topology, p.sp), tp_sequence_parallel=tp_sequence_parallel(cfg))
