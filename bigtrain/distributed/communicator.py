"""Who this rank is, and the few collectives that the parts of a run which only coordinate ranks
need: checkpoint writing and loading, the object-store mirror, validation, lm-eval tasks, the data
loader's share and the loop's stop decisions. Engines step; this is what everything else takes."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist


class Communicator(Protocol):
    rank: int
    world_size: int
    is_main: bool  # rank 0
    dp_rank: int  # this rank's place in its data-parallel group
    dp_size: int

    def barrier(self) -> None: ...
    def any_rank(self, flag: bool) -> bool: ...  # True on every rank if `flag` is on any
    def mean_over_dp(self, values: torch.Tensor) -> torch.Tensor: ...  # averaged over the data-parallel group
    def sum_across_dp(self, values: torch.Tensor) -> torch.Tensor: ...  # a CPU tensor summed over it


class LoneProcess:
    """One process: every collective is the identity."""

    rank, world_size, is_main, dp_rank, dp_size = 0, 1, True, 0, 1

    def barrier(self) -> None:
        """Nothing to wait for."""

    def any_rank(self, flag: bool) -> bool:
        return flag

    def mean_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def sum_across_dp(self, values: torch.Tensor) -> torch.Tensor:
        return values


class ProcessGroups:
    """The default process group, and `dp_group` (where this rank is `dp_rank` of `dp_size`) for
    the data-parallel reductions; tensors go through `device` (NCCL reduces only GPU tensors)."""

    def __init__(self, dp_group: dist.ProcessGroup, dp_rank: int, dp_size: int, device: torch.device):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.dp_group, self.dp_rank, self.dp_size, self.device = dp_group, dp_rank, dp_size, device

    def barrier(self) -> None:
        dist.barrier()

    def any_rank(self, flag: bool) -> bool:
        value = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value)

    def mean_over_dp(self, values: torch.Tensor) -> torch.Tensor:
        total = values.detach().float().to(self.device, copy=True)
        dist.all_reduce(total, group=self.dp_group)
        return total / self.dp_size

    def sum_across_dp(self, values: torch.Tensor) -> torch.Tensor:
        on_device = values.to(self.device, copy=True)
        dist.all_reduce(on_device, group=self.dp_group)
        return on_device.cpu()
