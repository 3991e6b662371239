"""Step-time split: seconds spent per phase (data, forward, backward, optimizer) between logs.

On CUDA the device phases are timed with CUDA events recorded on the stream, so timing adds no
host synchronisation per step; `read()` resolves them and is meant to be called at logging time
only (where the loop synchronises anyway). Host phases (waiting for data) and CPU devices use
`time.perf_counter`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    """Accumulates time per named phase until `read()` returns and resets the totals."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str, host: bool = False) -> Iterator[None]:
        """Time the enclosed block as `name`; `host=True` measures wall time even on CUDA."""
        if self.cuda and not host:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            started = time.perf_counter()
            yield
            self.host[name] += time.perf_counter() - started

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read (waits for the recorded CUDA events)."""
        totals = dict(self.host)
        for name, start, end in self.events:
            end.synchronize()
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end) / 1e3
        self.host.clear()
        self.events.clear()
        return totals
