"""A worker dies with its launcher: when the torchrun agent or the srun step that started this
process is gone (killed with `kill -9`, say), the process exits, committing nothing.

torchrun starts workers in sessions of their own, so they survive their agent; a restarted job
would then train beside them. A daemon thread checks every `POLL_S` seconds whether the process
has been re-parented (its launcher died) and ends it with `os._exit`; and because a thread can be
late, `check_launcher()` asks the same right before anything is committed (a checkpoint becoming
`latest`, a metrics record), so an orphan never commits.
"""

from __future__ import annotations

import os
import threading
import time

from bigtrain.errors import print_error

POLL_S = 0.5
EXIT_CODE = 70  # os.EX_SOFTWARE

_watched: tuple[str, int] | None = None  # (launcher, its pid) once `watch_launcher` runs


def launched_by() -> str | None:
    """`torchrun` or `srun` when one of them started this process, else None."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ:
        return "srun"
    return None


def watch_launcher() -> threading.Thread | None:
    """Exit this process as soon as the launcher that started it is gone (no-op without one)."""
    global _watched
    launcher = launched_by()
    parent = os.getppid()
    if launcher is None or parent == 1:
        return None
    _watched = (launcher, parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        _exit_orphaned()

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def check_launcher() -> None:
    """Exit now, before committing anything, if the watched launcher is gone."""
    if _watched is not None and os.getppid() != _watched[1]:
        _exit_orphaned()


def _exit_orphaned() -> None:
    launcher, parent = _watched
    print_error(f"the {launcher} process that started this worker (pid {parent}) is gone; exiting")
    os._exit(EXIT_CODE)
