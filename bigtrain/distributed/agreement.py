"""Decisions every rank must share (where to resume, whether the run may start, whether a check
failed): made once on rank 0 and broadcast, or checked by every rank and agreed in one collective.

A rank never decides such a thing from its own view of the files: two ranks reading `latest` a
moment apart while another job writes would resume from different steps. Without a process group
(one process) each function simply runs locally.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from bigtrain.errors import BigtrainError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_main(decide: Callable[[], T]) -> T:
    """`decide()` run on rank 0 alone; its result, or the `BigtrainError` it raised, on every rank."""
    rank, world = rank_and_world()
    outcome: tuple[T | None, str | None] = (None, None)
    if rank == 0:
        try:
            outcome = (decide(), None)
        except BigtrainError as e:
            outcome = (None, str(e))
    if world > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    result, error = outcome
    if error is not None:
        raise BigtrainError(error if rank == 0 else f"rank 0: {error}")
    return result


def check_all(problem: str | None) -> None:
    """Raise on every rank when any rank found a problem: a rank that found one with its own line,
    the others with the lowest finder's line, naming that rank."""
    rank, world = rank_and_world()
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    if problem is not None:
        raise BigtrainError(problem)
    for found_by, found in enumerate(problems):
        if found is not None:
            raise BigtrainError(f"rank {found_by}: {found}")
