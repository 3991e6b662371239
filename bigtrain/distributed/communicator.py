"""What the parts of a run that only coordinate ranks (checkpoint writing, the object-store mirror)
ask of the engine: who this rank is, and two collectives."""

from __future__ import annotations

from typing import Protocol


class Communicator(Protocol):
    rank: int
    world_size: int
    is_main: bool  # rank 0

    def barrier(self) -> None: ...
    def any_rank(self, flag: bool) -> bool: ...  # True on every rank if `flag` is on any
