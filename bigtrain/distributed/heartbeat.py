"""Which rank stopped answering, and why: every rank bumps its counter in the rendezvous store (the
one torchrun's agent or rank 0 hosts at MASTER_ADDR:MASTER_PORT) every `INTERVAL_S` seconds from a
background thread, and a rank that stops on a `BigtrainError` posts its line there first
(`report_error`). When a collective fails or times out, the survivors look for the counters that
stopped moving; a rank that died or froze (`kill -9`, `SIGSTOP`, a hung host) is named in the
error, with the line it posted. Under plain srun rank 0 hosts the store, so its own line is lost
with it: the others then name the store's host.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta
from typing import NoReturn

import torch.distributed as dist

from bigtrain.errors import BigtrainError, print_error

INTERVAL_S = 1.0
KEY = "bigtrain/heartbeat/{}"
ERROR_KEY = "bigtrain/error/{}"

_running: Heartbeat | None = None


class Heartbeat:
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.store = _connect()
        self.store.add(KEY.format(rank), 1)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        store = _connect()  # a client of its own: the main thread may be blocked in the other
        while not self.stopped.wait(INTERVAL_S):
            try:
                store.add(KEY.format(self.rank), 1)
            except Exception:  # the store's host is gone; `silent_ranks` says so
                return
        del store  # closed here, not by the interpreter's exit (which can abort on a live client)

    def silent_ranks(self) -> list[int] | None:
        """The other ranks whose counter did not move for a few intervals; None when the store
        itself stopped answering (its host, rank 0 or the launcher, is gone)."""
        try:
            store = _connect(timeout_s=2 * INTERVAL_S)
            before = [store.add(KEY.format(r), 0) for r in range(self.world_size)]
            time.sleep(3 * INTERVAL_S)
            after = [store.add(KEY.format(r), 0) for r in range(self.world_size)]
        except Exception:
            return None
        return [r for r in range(self.world_size) if r != self.rank and before[r] == after[r]]

    def posted_error(self, rank: int) -> str | None:
        try:
            store = _connect(timeout_s=2 * INTERVAL_S)
            return store.get(ERROR_KEY.format(rank)).decode() if store.check([ERROR_KEY.format(rank)]) else None
        except Exception:
            return None

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()
        del self.store


def _connect(timeout_s: float = 10.0) -> dist.TCPStore:
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


def start(rank: int, world_size: int) -> None:
    """Start this process's heartbeat (once the process group exists)."""
    global _running
    if _running is None and world_size > 1:
        _running = Heartbeat(rank, world_size)


class PeersLost(BigtrainError):
    """Another rank died or froze: the process group cannot go on (leave without cleaning it up)."""


def report_error(message: str) -> None:
    """Post this rank's error line for the others, before it leaves (no-op without a heartbeat)."""
    if _running is not None:
        try:
            _running.store.set(ERROR_KEY.format(_running.rank), message)
        except Exception:  # the store's host is gone too: nobody is left to read it
            pass


def check_peers(error: BaseException) -> None:
    """Raise `PeersLost` naming the ranks that stopped answering when one did (`error`, a failed
    collective or what it caused, is then only the symptom), with the error line such a rank
    posted; otherwise return."""
    if _running is None:
        return
    silent = _running.silent_ranks()
    if silent == []:
        return
    if silent is None:
        who = "the rendezvous store's host (rank 0 or the launcher)"
    else:
        for rank in silent:
            line = _running.posted_error(rank)
            if line:
                raise PeersLost(f"rank {rank}: {line}") from None
        who = ("rank " if len(silent) == 1 else "ranks ") + ", ".join(map(str, silent))
    symptom = re.sub(r"^\[[^\]]*\]\s*", "", (str(error).strip().splitlines() or [type(error).__name__])[0])
    raise PeersLost(f"{who} stopped answering ({symptom.split('. ')[0]}); stopping rank {_running.rank}") from None


def leave(error: PeersLost) -> NoReturn:
    """End this process at once with `error`'s line: the process group is broken, and waiting on
    it (its teardown, an exit handler's collective) could hang."""
    print_error(str(error))
    os._exit(1)


def stop() -> None:
    """End this process's heartbeat (at a normal end of training, before the process group goes)."""
    global _running
    if _running is not None:
        _running.stop()
        _running = None
