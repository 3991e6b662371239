"""One writer per run directory: the process that writes a run (rank 0) holds an OS lock on
`<run dir>/.lock` for the whole run.

The lock is `flock(2)`, so the kernel releases it when the holder exits in any way, `kill -9`
included; the file itself stays and names the last holder (host, pid, Slurm job, start time).
On NFS, Linux maps `flock` to POSIX record locks that the server arbitrates; Lustre supports it
only when mounted with `-o flock`. Where locking is unsupported, `run.lock=false` turns it off.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+")  # never truncated before the lock is ours: it names the holder
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    file.close()
                    raise BigtrainError(f"cannot lock {self.path} ({e.strerror}); on a filesystem without "
                                        "file locks set run.lock=false") from None
            if time.monotonic() >= deadline:
                holder = _describe(self.path)
                file.close()
                waited = f" after waiting {wait_s:g} s" if wait_s else ""
                raise BigtrainError(f"{self.path.parent} is in use by {holder}{waited}; "
                                    "wait for it with --wait-lock SECONDS (run.wait_lock) or choose another run.dir")
            time.sleep(POLL_S)
        file.seek(0)
        file.truncate()
        file.write(json.dumps(holder_info()) + "\n")
        file.flush()
        self.file = file
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None


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
