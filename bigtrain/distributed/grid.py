"""The process-group grid handed to DeepSpeed as its `mpu`: pipeline, data, tensor and sequence
parallel groups (see `topology.py` for how ranks are laid out)."""

from __future__ import annotations

import itertools

import torch.distributed as dist
from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology


class Grid(PipelineParallelGrid):
    """DeepSpeed's grid whose data axis is dp × sp (sp fastest), plus the groups and `mpu` methods of
    DeepSpeed-Ulysses: the sequence-parallel group (ranks that share windows) and the
    sequence-data-parallel group (the whole data axis: ZeRO partitions and reduces over it, summing
    gradients over sp and averaging over dp). `replica_group` is the pure data-parallel group."""

    def __init__(self, topology: PipeModelDataParallelTopology, sp: int):
        super().__init__(topology)
        self.sp = sp
        me = topology.get_coord(self.global_rank)
        self.sp_rank, self.replica_rank = me.data % sp, me.data // sp
        dims = [topology.get_dim(axis) for axis in ("pipe", "data", "model")]
        self.sp_proc_group, self.replica_group = None, self.get_data_parallel_group()
        if sp == 1:
            return
        for pipe, model in itertools.product(range(dims[0]), range(dims[2])):
            line = [topology.get_rank(pipe=pipe, data=d, model=model) for d in range(dims[1])]
            for replica in range(dims[1] // sp):  # every rank creates every group, in one order
                group = dist.new_group(line[replica * sp:(replica + 1) * sp])
                if (pipe, replica, model) == (me.pipe, self.replica_rank, me.model):
                    self.sp_proc_group = group
            for shard in range(sp):
                group = dist.new_group(line[shard::sp])
                if (pipe, shard, model) == (me.pipe, self.sp_rank, me.model):
                    self.replica_group = group

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
