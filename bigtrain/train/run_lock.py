"""One writer per run directory: the process that writes a run (rank 0) holds an OS lock on
`<run dir>/.lock` for the whole run, and no other rank of its job starts before rank 0 holds it.

The lock is `flock(2)`, so the kernel releases it when the holder exits in any way, `kill -9`
included; the file itself stays and names the last holder (host, pid, Slurm job, start time).
On NFS, Linux maps `flock` to POSIX record locks that the server arbitrates; Lustre supports it
only when mounted with `-o flock`. Where locking is unsupported, `run.lock=false` turns it off.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from bigtrain.distributed.agreement import from_main, rank_and_world
from bigtrain.errors import BigtrainError

LOCK_FILE = ".lock"
POLL_S = 0.5


class RunLock:
    """Holds the lock of `run_dir` from `acquire()` until `release()` or the process's end."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.file = None

    def acquire(self, wait_s: float = 0.0) -> RunLock:
        """Take the lock, waiting up to `wait_s` seconds for a holder to let go; a run still held
        after that is one `BigtrainError` naming the holder."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                raise BigtrainError(self.refusal(wait_s))
            time.sleep(POLL_S)
        return self

    def try_acquire(self) -> bool:
        """Take the lock if it is free (True) and write this process into the file."""
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a+")  # never truncated before the lock is ours: it names the holder
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            self.file.close()
            self.file = None
            raise BigtrainError(f"cannot lock {self.path} ({e.strerror}); on a filesystem without "
                                "file locks set run.lock=false") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps(holder_info()) + "\n")
        self.file.flush()
        return True

    def refusal(self, waited_s: float) -> str:
        """The one line for a run directory still held after waiting `waited_s` seconds."""
        waited = f" after waiting {waited_s:g} s" if waited_s else ""
        return (f"{self.path.parent} is in use by {_describe(self.path)}{waited}; "
                "wait for it with --wait-lock SECONDS (run.wait_lock) or choose another run.dir")

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@contextlib.contextmanager
def run_lock(run_dir: Path, wait_s: float, enabled: bool = True) -> Iterator[None]:
    """Rank 0 holds the lock of `run_dir` for the block. Every rank waits in step with it (one
    broadcast per poll) and enters only once rank 0 holds the lock, so no rank reads the run
    directory while another job still writes it; a refusal leaves every rank with rank 0's line."""
    rank, _ = rank_and_world()
    lock = RunLock(run_dir) if enabled and rank == 0 else None
    deadline = time.monotonic() + wait_s

    def held() -> bool:  # rank 0's verdict: held, not yet, or (raised) refused
        if lock is None or lock.try_acquire():
            return True
        if time.monotonic() >= deadline:
            raise BigtrainError(lock.refusal(wait_s))
        return False

    try:
        while not from_main(held):
            time.sleep(POLL_S)
        yield
    finally:
        if lock is not None:
            lock.release()


def holder_info() -> dict[str, object]:
    return {
        "host": socket.gethostname(), "pid": os.getpid(), "job_id": os.environ.get("SLURM_JOB_ID"),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return "another process (its lock file names none yet)"
    job = f", Slurm job {info['job_id']}" if info.get("job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('started')}"
