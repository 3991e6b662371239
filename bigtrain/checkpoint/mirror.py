"""The mirror of a run's checkpoints in object storage (`checkpoint.remote`).

The remote holds what `checkpoints/` holds: `step-NNNNNNN/` directories and a `latest` object.
After each local checkpoint is complete, every rank uploads its share of the files (the share it
checksummed: file i of `files.json` goes to rank i mod world, `files.json` itself to rank 0) in a
background thread, so the steps go on. The ranks agree that every file arrived only where they
already meet: at logging steps while an upload is in flight, before the next save, at the end.
Only then does rank 0 write the remote `latest`, and only after that does it delete remote
checkpoints beyond `checkpoint.keep_last`. So the remote `latest` always names a checkpoint all of
whose files are there, whatever moment the job is killed at.

The run directory is shared by all ranks (as for every checkpoint); a fetch is the reverse: each
rank downloads its share into `checkpoints/.tmp-step-…`, checks it against `files.json`, and rank 0
renames the directory and points the local `latest` at it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from bigtrain.checkpoint.files import checkpoint_problem, write_latest
from bigtrain.checkpoint.format import FILES
from bigtrain.config import CheckpointConfig
from bigtrain.distributed.agreement import check_all, from_main
from bigtrain.distributed.communicator import Communicator
from bigtrain.distributed.launcher_watch import check_launcher
from bigtrain.errors import BigtrainError
from bigtrain.object_store import Retry, Store, StoreError, open_store, retrying

T = TypeVar("T")
LATEST = "latest"


def insist(action: Callable[[], T], retries: int, who: str = "") -> T:
    """`action()`, tried `retries` more times after any failure, even a missing bucket (a long
    run outlives a passing outage or expired token), 1, 2, 4 … s apart (at most 60); each retry
    is a warning on stderr, prefixed with `who`."""
    retry = Retry(tries=retries + 1, backoff_s=1.0, max_backoff_s=60.0, retry_permanent=True)
    return retrying(action, retry, lambda line: print(f"bigtrain: warning: {who}{line}",
                                                      file=sys.stderr, flush=True))


@dataclass
class Upload:
    """One checkpoint's upload by this rank, run by `thread`."""

    name: str
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None
    completed: bool = False
    error: str | None = None
    thread: threading.Thread | None = None


class CheckpointMirror:
    """Uploads checkpoints to `cfg.remote` in the background and fetches the newest one back."""

    def __init__(self, cfg: CheckpointConfig):
        self.store, self.keep_last, self.retries = open_store(cfg.remote), cfg.keep_last, cfg.remote_retries
        self.url = self.store.url
        self.reached = from_main(self.remote_latest)  # the checkpoint the remote `latest` names, read once
        self.expected: str | None = None  # the newest checkpoint handed to `upload`
        self.failure: str | None = None  # why the newest upload that ended did not reach the remote
        self.pending: Upload | None = None

    def remote_latest(self) -> str | None:
        try:
            text = insist(lambda: self.store.read_text(LATEST), self.retries)
        except StoreError as e:
            raise BigtrainError(f"checkpoint.remote={self.url}: {e}") from None
        return text.strip() if text else None

    def upload(self, checkpoint: Path, comm: Communicator) -> None:
        """Start uploading this rank's share of `checkpoint` (complete locally) in a thread."""
        listed = sorted(json.loads((checkpoint / FILES).read_text()))
        share = listed[comm.rank::comm.world_size] + ([FILES] if comm.is_main else [])
        up = self.pending = Upload(checkpoint.name)
        up.thread = threading.Thread(target=self._upload, args=(up, checkpoint, share, comm.rank),
                                     name=f"upload-{checkpoint.name}", daemon=True)
        self.expected = checkpoint.name
        up.thread.start()

    def _upload(self, up: Upload, checkpoint: Path, share: list[str], rank: int) -> None:
        try:
            for file in share:
                key = f"{up.name}/{file}"
                insist(lambda key=key, file=file: self.store.put(checkpoint / file, key), self.retries,
                       f"rank {rank}: ")
            up.completed = True
        except Exception as e:  # noqa: BLE001 - a thread must report whatever stopped it
            up.error = str(e) or type(e).__name__
        finally:
            up.seconds = time.perf_counter() - up.started

    def poll(self, comm: Communicator) -> dict[str, Any] | None:
        """At a step where the ranks meet anyway: finish the upload in flight if every rank is done."""
        if self.pending is None or comm.any_rank(self.pending.thread.is_alive()):
            return None
        return self._finish(comm)

    def wait(self, comm: Communicator) -> dict[str, Any] | None:
        """Wait for the upload in flight (before the next save, at the end) and finish it."""
        if self.pending is None:
            return None
        self.pending.thread.join()
        return self._finish(comm)

    def _finish(self, comm: Communicator) -> dict[str, Any] | None:
        """Rank 0 writes the remote `latest` once every rank's files arrived, then prunes; the
        record to log, or None when the checkpoint did not reach the remote (a warning says why)."""
        up, self.pending = self.pending, None
        if not comm.any_rank(not up.completed) and comm.is_main:
            check_launcher()  # an orphaned worker commits nothing
            try:
                insist(lambda: self.store.write_text(LATEST, up.name + "\n"), self.retries)
            except StoreError as e:
                up.error = str(e)
        if comm.any_rank(up.error is not None or not up.completed):
            self.failure = up.error or "the upload of another rank failed"
            if comm.is_main:
                print(f"bigtrain: warning: checkpoint {up.name} did not reach {self.url} ({self.failure}); "
                      f"the remote latest names {self.reached or 'nothing'}; training goes on", file=sys.stderr,
                      flush=True)
            return None
        self.reached, self.failure = up.name, None
        if comm.is_main:
            self._prune(up.name)
        return {"checkpoint_remote": f"{self.url}/{up.name}", "checkpoint_upload_s": up.seconds}

    def _prune(self, latest: str) -> None:
        """Delete remote checkpoints older than the `keep_last` newest up to `latest`."""
        if not self.keep_last:
            return
        try:
            names = [n for n in self.store.children() if n.startswith("step-") and n <= latest]
            for old in names[:-self.keep_last]:
                self.store.delete_tree(old)
        except StoreError as e:
            print(f"bigtrain: warning: cannot prune {self.url}: {e}", file=sys.stderr, flush=True)

    def check_final(self) -> None:
        """Refuse, in one line, a run whose newest checkpoint never reached the remote."""
        if self.expected is not None and self.reached != self.expected:
            raise BigtrainError(
                f"the final checkpoint {self.expected} did not reach {self.url} ({self.failure}); it is complete "
                f"locally; the remote latest names {self.reached or 'nothing'}")

    def fetch(self, root: Path, comm: Communicator) -> Path:
        """Download the checkpoint the remote `latest` names into `root` (the run's `checkpoints/`),
        checked against its `files.json`, and point the local `latest` at it."""
        name = self.reached
        final, tmp = root / name, root / f".tmp-{name}"

        def make_room() -> None:
            if final.exists():
                raise BigtrainError(f"{final} exists but checkpoints/latest does not name it; move it aside "
                                    f"to resume from {self.url}/{name}")
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()

        from_main(make_room)  # the other ranks wait for it, or leave with its refusal
        problem = download(self.store, name, tmp, (comm.rank, comm.world_size), self.retries)
        comm.barrier()
        problem = problem or checkpoint_problem(tmp, share=(comm.rank, comm.world_size))
        check_all(problem and f"cannot fetch {self.url}/{name}: {problem}")
        if comm.is_main:
            os.rename(tmp, final)
            write_latest(root, name)
        comm.barrier()
        return final


def download(store: Store, name: str, tmp: Path, share: tuple[int, int], retries: int) -> str | None:
    """Download files `share` = (rank, world) of remote checkpoint `name` into `tmp` (rank 0 also
    `files.json`); what went wrong, or None."""
    rank, world = share
    try:
        text = insist(lambda: store.read_text(f"{name}/{FILES}"), retries)
        if text is None:
            return f"{store.url}/{name} has no {FILES}: it is not a complete checkpoint"
        for i, file in enumerate(sorted(json.loads(text))):
            if i % world == rank:
                insist(lambda file=file: store.get(f"{name}/{file}", tmp / file), retries)
        if rank == 0:
            (tmp / FILES).write_text(text)
    except StoreError as e:
        return str(e)
    return None


def cache_root() -> Path:
    """Where remote checkpoints read by `eval`, `convert` and `generate` are kept: $BIGTRAIN_CACHE
    or ~/.cache/bigtrain, under `checkpoints/<scheme>/<bucket>/<prefix>/`."""
    return Path(os.environ.get("BIGTRAIN_CACHE") or Path.home() / ".cache" / "bigtrain") / "checkpoints"


def cached_checkpoint(url: str) -> Path:
    """The checkpoint at `url`, or the one the `latest` of remote root `url` names, as a local
    directory: downloaded into the cache and verified the first time, reused after."""
    url = url.rstrip("/")
    store = open_store(url)
    retries = CheckpointConfig().remote_retries
    latest = insist(lambda: store.read_text(LATEST), retries)
    if latest is None:  # `url` itself is a checkpoint
        url, name = url.rsplit("/", 1)
        store = open_store(url)
    else:
        name = latest.strip()
    parsed = urlparse(url)
    final = cache_root() / parsed.scheme / parsed.netloc / parsed.path.strip("/") / name
    if final.is_dir():
        return final
    tmp = final.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    problem = download(store, name, tmp, (0, 1), retries) or checkpoint_problem(tmp)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BigtrainError(f"cannot fetch {url}/{name}: {problem}")
    os.rename(tmp, final)
    return final
