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
        self.open: dict[str, torch.cuda.Event | float] = {}

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

    def start(self, name: str) -> None:
        """Start an interval of `name`, ended by `stop` (for intervals no one block of code
        encloses, such as communication inside autograd's backward)."""
        if self.cuda:
            self.open[name] = torch.cuda.Event(enable_timing=True)
            self.open[name].record()
        else:
            self.open[name] = time.perf_counter()

    def stop(self, name: str) -> None:
        """End the interval of `name` `start` began (none open: nothing to time)."""
        started = self.open.pop(name, None)
        if started is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((name, started, end))
        else:
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
