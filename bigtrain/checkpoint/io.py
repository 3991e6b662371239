"""Checkpoints of a run: a directory `checkpoints/step-NNNNNNN/` that is either complete or absent.

It is written under a temporary name, fsync'd and renamed; only then is `checkpoints/latest`
replaced (atomically) to name it. Every rank writes and checksums its own files; rank 0 renames
once every rank's checksum share is there. With `checkpoint.async` the files are copied to host
memory at the save step and written by a background thread, under the same rule. What the
directory holds is `bigtrain.checkpoint.format`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Protocol

import torch
from safetensors import SafetensorError

from bigtrain.checkpoint import safe_load
from bigtrain.checkpoint.files import (
    SHARE_PREFIX,
    checkpoint_problem,
    fsync_path,
    merge_checksum_shares,
    share_written,
    write_checksum_share,
    write_latest,
)
from bigtrain.checkpoint.format import (
    STATE,
    TOKENIZER,
    WEIGHTS,
    load_weights,
    read_config,
    read_state,
    rng_file,
    write_config,
    write_state,
)
from bigtrain.checkpoint.mirror import cached_checkpoint
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import Config, ModelConfig
from bigtrain.distributed import heartbeat
from bigtrain.distributed.agreement import check_all
from bigtrain.distributed.communicator import Communicator
from bigtrain.distributed.launcher_watch import check_launcher
from bigtrain.errors import BigtrainError, first_line
from bigtrain.model import Llama
from bigtrain.object_store import is_remote


class Checkpointable(Protocol):
    """What saving and loading a checkpoint asks of an engine: its own files (every rank its part)."""

    def save(self, directory: Path, writes: Direct) -> None: ...
    def load(self, directory: Path) -> None: ...


SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "head_dim", "ffn_dim", "tie_embeddings")


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None when the run has none yet."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    return checkpoint_root(run_dir) / pointer.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory, a run directory or its `checkpoints/` (meaning the latest
    checkpoint), or the URL of a remote checkpoint or remote root (s3://, gs://: fetched into the
    local cache and verified once)."""
    if is_remote(path):
        return cached_checkpoint(str(path))
    path = Path(path)
    if not path.exists():
        raise BigtrainError(f"checkpoint not found: {path}")
    if (path / STATE).is_file():
        return path
    for root in (checkpoint_root(path), path, checkpoint_root(path.parent)):
        pointer = root / "latest"
        latest = root / pointer.read_text().strip() if pointer.is_file() else None
        if latest is not None and (latest / STATE).is_file():
            return latest
    raise BigtrainError(f"{path} is neither a checkpoint nor a run directory with checkpoints/latest")


def save_checkpoint(
    run_dir: Path, step: int, engine: Checkpointable, comm: Communicator, state: dict[str, Any], config: Config,
    tokenizer: Path | None, keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, prune the oldest; return once it
    is complete on every rank. A save that fails (a full disk, say) removes its partial directory
    and leaves `latest` as it was."""
    save = begin_save(run_dir, step, engine, comm, state, config, tokenizer, keep_last, Direct())
    save.write_together(comm)
    return save.finish(comm)


def begin_save(
    run_dir: Path, step: int, engine: Checkpointable, comm: Communicator, state: dict[str, Any], config: Config,
    tokenizer: Path | None, keep_last: int | None, writes: Direct,
) -> PendingSave:
    """The part of a save every rank takes part in: `.tmp-step-N/` made, the engine's files and
    this rank's RNG state written or staged by `writes`, and (rank 0) state, config and tokenizer."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:07d}"
    save = PendingSave(root / f".tmp-{name}", root / name, comm.rank, comm.world_size, writes, keep_last,
                       timeout_s=60 * config.parallel.timeout_minutes)
    if save.final.exists():
        raise BigtrainError(f"refusing to overwrite existing checkpoint {save.final}")
    try:
        if comm.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(save.tmp, ignore_errors=True)  # a leftover of a crashed save of this same step
            save.tmp.mkdir()
        comm.barrier()
        engine.save(save.tmp, writes)  # every rank its own part
        writes.torch_save(rng_state(), save.tmp / rng_file(comm.rank))
        if comm.is_main:
            write_state(save.tmp, {"step": step, **state})
            write_config(save.tmp, config)
            if tokenizer is not None:
                shutil.copyfile(tokenizer, save.tmp / TOKENIZER)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap OSErrors
        save.abandon(comm, e)
    return save


@dataclass
class PendingSave:
    """A checkpoint being written under `tmp`, to become `final`: every rank writes its files and
    its checksum share (`write_share`), then rank 0, once every share is there, completes
    `files.json`, renames and points `latest` at it (`commit`). In an asynchronous save
    (`checkpoint.async`) a background thread does both; the loop meets it in `finish`."""

    tmp: Path
    final: Path
    rank: int
    world: int
    writes: Direct
    keep_last: int | None
    error: str | None = None
    began: float = field(default_factory=time.perf_counter)
    stall_s: float | None = None  # how long the loop waited for it
    written_s: float | None = None  # from `begin_save` until this rank's part is done (rank 0's: committed)
    thread: threading.Thread | None = None
    timeout_s: float = 1800.0  # how long rank 0 waits for the others' shares in the background

    def write_share(self) -> None:
        try:
            self.writes.flush()
            write_checksum_share(self.tmp, self.rank, self.writes.written)
        except (OSError, RuntimeError, SafetensorError) as e:
            self.error = first_line(e)
            with contextlib.suppress(OSError):  # tells rank 0 to stop waiting
                (self.tmp / f"{SHARE_PREFIX}{self.rank}.failed").write_text(self.error)

    def write_together(self, comm: Communicator) -> None:
        """The synchronous save: every rank writes its share, then rank 0 commits unless one failed."""
        self.write_share()
        try:
            failed = comm.any_rank(self.error is not None)
        except RuntimeError as e:
            self.abandon(comm, e)
        if comm.is_main and not failed:
            self.commit()

    def commit(self) -> None:
        """Rank 0, once every rank's share is written."""
        try:
            merge_checksum_shares(self.tmp, self.world)
            check_launcher()  # an orphaned worker commits nothing
            os.rename(self.tmp, self.final)
            root = self.final.parent
            fsync_path(root)
            write_latest(root, self.final.name)
            if self.keep_last:
                for old in sorted(root.glob("step-*"))[:-self.keep_last]:
                    shutil.rmtree(old)
        except (OSError, ValueError) as e:
            self.error = first_line(e)

    def write_in_background(self) -> None:
        def write() -> None:
            self.write_share()
            if self.rank == 0 and self.error is None:
                self._wait_for_shares()
                if self.error is None:
                    self.commit()
            self.written_s = time.perf_counter() - self.began

        self.thread = threading.Thread(target=write, name=f"save-{self.final.name}", daemon=True)
        self.thread.start()

    def _wait_for_shares(self) -> None:
        waiting, deadline = set(range(self.world)), time.monotonic() + self.timeout_s
        while waiting:
            if time.monotonic() > deadline:
                self.error = (f"rank(s) {sorted(waiting)} did not finish writing within {self.timeout_s / 60:g} "
                              "minutes (parallel.timeout_minutes)")
                return
            for rank in list(waiting):
                failed = self.tmp / f"{SHARE_PREFIX}{rank}.failed"
                if failed.is_file():
                    self.error = f"rank {rank}: {failed.read_text()}"
                    return
                if share_written(self.tmp, rank):
                    waiting.discard(rank)
            if waiting:
                time.sleep(0.05)

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def finish(self, comm: Communicator) -> Path:
        """Every rank, together: wait for this rank's part, then return the committed checkpoint,
        or raise on every rank when any rank's part failed (rank 0 removes the partial directory)."""
        if self.thread is not None:
            self.thread.join()
        if comm.any_rank(self.error is not None):
            self._remove_partial(comm)
            reason = self.error or "another rank could not write its files"
            raise BigtrainError(f"cannot save checkpoint {self.final}: {reason}; {self._kept()}")
        return self.final

    def abandon(self, comm: Communicator, e: BaseException) -> NoReturn:
        """A collective or a write of the synchronous part failed: name a lost rank if one was
        lost, else raise `e`'s line; `latest` is left as it was."""
        try:
            heartbeat.check_peers(e)  # a barrier failed because another rank died or stopped: say that
        finally:  # rank 0 alone, once the others had time to stop: a rank never pulls the directory
            self._remove_partial(comm)  # from under another that is still writing its share
        raise BigtrainError(f"cannot save checkpoint {self.final}: {first_line(e)}; {self._kept()}") from None

    def _remove_partial(self, comm: Communicator) -> None:
        if comm.is_main:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _kept(self) -> str:
        latest = latest_checkpoint(self.final.parent.parent)
        return f"checkpoints/latest still names {latest.name}" if latest else "no checkpoint was written"


def load_checkpoint(checkpoint: Path, engine: Checkpointable, comm: Communicator, verify: bool = True) -> dict[str, Any]:
    """Restore engine and RNG state; return the JSON state (step, tokens, loader, …). Every rank
    checks the sizes of all files and, with `verify`, the checksums of its share of them."""
    check_all(checkpoint_problem(checkpoint, share=(comm.rank, comm.world_size), checksums=verify))
    state = read_state(checkpoint)  # nothing is read before every rank found the files sound
    try:
        engine.load(checkpoint)
        rng = checkpoint / rng_file(comm.rank)
        if rng.exists():  # absent when resuming on more ranks than saved
            set_rng_state(safe_load.load(rng))
    except (pickle.UnpicklingError, RuntimeError, OSError, SafetensorError) as e:
        raise BigtrainError(f"cannot load checkpoint {checkpoint}: {first_line(e)}") from None
    return state


def open_checkpoint(path: str | Path, checksums: bool = True) -> Path:
    """The checkpoint at `path` (resolved as `resolve_checkpoint` does), refused in one line unless
    `checkpoint_problem` finds nothing: the one way into a checkpoint for every reader."""
    checkpoint = resolve_checkpoint(path)
    problem = checkpoint_problem(checkpoint, checksums=checksums)
    if problem:
        raise BigtrainError(problem)
    return checkpoint


def check_same_model(checkpoint: Path, model: ModelConfig) -> None:
    """Refuse a checkpoint whose model shape differs from `model`, naming the first differing key."""
    saved = read_config(checkpoint).model
    for key in SHAPE_KEYS:
        if getattr(saved, key) != getattr(model, key):
            raise BigtrainError(
                f"{checkpoint} holds a model with model.{key}={getattr(saved, key)}, "
                f"but the config has model.{key}={getattr(model, key)}"
            )


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def initial_weights_file(path: str | Path, model: ModelConfig) -> Path:
    """The checked `model.safetensors` of checkpoint `path` (or a run's latest) for `model.init_from`."""
    checkpoint = open_checkpoint(path)
    check_same_model(checkpoint, model)
    if not (checkpoint / WEIGHTS).exists():
        raise BigtrainError(f"{checkpoint} holds only tensor/pipeline-parallel shards; "
                            "run bigtrain convert reshard first")
    return checkpoint / WEIGHTS


def load_initial_weights(model: Llama, weights: Path) -> None:
    """Load `weights` (an `initial_weights_file`) into `model` (`model.init_from`)."""
    checkpoint = weights.parent
    try:
        load_weights(model, checkpoint)
    except (OSError, SafetensorError) as e:
        raise BigtrainError(f"cannot load weights from {checkpoint}: {e}") from None


def load_trained_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, Path]:
    """Rebuild the model of a checkpoint (or a run's latest) for evaluation or generation."""
    checkpoint = open_checkpoint(path)
    config = read_config(checkpoint)
    model = Llama(config.model)
    if not (checkpoint / WEIGHTS).exists():
        raise BigtrainError(
            f"{checkpoint} holds only tensor/pipeline-parallel DeepSpeed shards (no model.safetensors); "
            "read it with bigtrain.convert.consolidate.load_full_model (as bigtrain eval and generate do)"
        )
    try:
        load_weights(model, checkpoint)
    except OSError as e:
        raise BigtrainError(f"cannot load weights from {checkpoint}: {e}") from None
    return model.to(device).eval(), config, checkpoint
