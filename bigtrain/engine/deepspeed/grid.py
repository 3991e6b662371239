"""Where each rank sits in the pp × dp × sp × tp grid, and the process groups DeepSpeed gets as its
`mpu`: DeepSpeed's own `PipelineParallelGrid` over a `PipeModelDataParallelTopology` (tp varies
fastest, so a tensor-parallel group sits inside a node, then sp). Its data axis holds dp × sp
ranks: the sequence-parallel ranks of a replica take part in ZeRO's partitioning and gradient
reduction, as DeepSpeed's sequence-data-parallel group does."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import deepspeed
import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

from bigtrain.config import Config
from bigtrain.distributed.topology import ProcessEnv, init_processes, process_env
from bigtrain.parallel.layout import check_layout, tp_sequence_parallel


class Grid(PipelineParallelGrid):
    """DeepSpeed's grid whose data axis is dp × sp (sp fastest), plus the groups and `mpu` methods of
    DeepSpeed-Ulysses: the sequence-parallel group (ranks that share windows) and the
    sequence-data-parallel group (the whole data axis: ZeRO partitions and reduces over it, summing
    gradients over sp and averaging over dp). `replica_group` is the pure data-parallel group.

    With expert parallelism, ep consecutive replicas (same sp rank) form an `ep_group` that shares
    out the experts; the `expert_data_group` holds the ranks of the data axis with the same experts
    (the replicas ep apart, all their sp ranks): expert gradients are reduced over it."""

    def __init__(self, topology: PipeModelDataParallelTopology, sp: int, ep: int = 1):
        super().__init__(topology)
        self.sp, self.ep = sp, ep
        me = topology.get_coord(self.global_rank)
        self.sp_rank, self.replica_rank = me.data % sp, me.data // sp
        self.ep_rank = self.replica_rank % ep
        pipes, data, models = (topology.get_dim(axis) for axis in ("pipe", "data", "model"))
        self.sp_proc_group, self.replica_group = None, self.get_data_parallel_group()
        self.ep_group = self.expert_data_group = None
        mine = (me.pipe, me.model)
        for pipe, model in itertools.product(range(pipes), range(models)):  # every rank creates every group, in one order
            line = [topology.get_rank(pipe=pipe, data=d, model=model) for d in range(data)]
            replicas = [line[r * sp:(r + 1) * sp] for r in range(data // sp)]  # each replica's sp ranks
            if sp > 1:
                for replica, ranks in enumerate(replicas):
                    group = dist.new_group(ranks)
                    if (pipe, model) == mine and replica == self.replica_rank:
                        self.sp_proc_group = group
                for shard in range(sp):
                    group = dist.new_group(line[shard::sp])
                    if (pipe, model) == mine and shard == self.sp_rank:
                        self.replica_group = group
            if ep > 1:
                for first, shard in itertools.product(range(0, len(replicas), ep), range(sp)):
                    group = dist.new_group([replicas[first + j][shard] for j in range(ep)])
                    if (pipe, model) == mine and (first, shard) == (self.replica_rank - self.ep_rank, self.sp_rank):
                        self.ep_group = group
                for j in range(ep):
                    group = dist.new_group(sorted(rank for ranks in replicas[j::ep] for rank in ranks))
                    if (pipe, model) == mine and j == self.ep_rank:
                        self.expert_data_group = group

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return self.sp_proc_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.sp_rank

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return self.get_data_parallel_group()

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.get_data_parallel_world_size()

    def get_sequence_data_parallel_rank(self) -> int:
        return self.get_data_parallel_rank()


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
    ep: int = 1  # expert-parallel degree (carved from dp)

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

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        """The ranks that share out the experts (None without expert parallelism)."""
        return self.grid.ep_group


def init_topology(cfg: Config) -> Topology:
    """Check the layout, start the processes (if not yet) and build DeepSpeed's grid of groups."""
    check_layout(cfg, process_env().world_size)
    init_processes(cfg)
    return grid_topology(cfg)


def grid_topology(cfg: Config) -> Topology:
    """DeepSpeed's grid of groups over the process group already started (a real or a fake one)."""
    env = process_env()
    dp = check_layout(cfg, env.world_size)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)  # adopts it
    p = cfg.parallel
    topology = PipeModelDataParallelTopology(num_pp=p.pp, num_mp=p.tp, num_dp=dp * p.sp)
    return Topology(env=env, dp=dp, tp=p.tp, pp=p.pp, sp=p.sp, process_topology=topology,
                    grid=Grid(topology, p.sp, p.ep), tp_sequence_parallel=tp_sequence_parallel(cfg), ep=p.ep)
