"""Preemption: SIGUSR1 or SIGTERM asks the run to checkpoint at its next logging step and stop.

Before training starts (imports, the lock, resuming) there is nothing to save, so a signal ends
the process at once with one line. Once the loop runs (`defer()`), the handler only sets a flag, so
a signal can never interrupt a step or a checkpoint half-way; a second signal while the checkpoint
is being written is just noted. The loop agrees on the flag across ranks at logging steps, saves,
and the command exits with `PREEMPTED_EXIT_CODE` so that a batch script can tell "saved, resubmit
me" from success and from a crash.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure, try again later
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """While active (a context manager), SIGUSR1 and SIGTERM end the process at once until `defer()`,
    then set `requested` instead."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.deferred = False  # True once training runs: a signal then means "save, then stop"
        self._previous: dict[int, object] = {}

    def defer(self) -> None:
        """From now on a signal asks for a checkpoint at the next logging step instead of an exit."""
        self.deferred = True

    @property
    def requested(self) -> bool:
        return bool(self.received)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.deferred:  # os.write, not print: a handler may run while the main thread is in a print
            os.write(2, f"bigtrain: received {name} before training started; exiting (nothing to save)\n".encode())
            os._exit(PREEMPTED_EXIT_CODE)
        self.received.append(name)
        note = "will checkpoint at the next logging step and stop" if len(self.received) == 1 else "already stopping"
        os.write(2, f"bigtrain: received {name}; {note}\n".encode())

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
