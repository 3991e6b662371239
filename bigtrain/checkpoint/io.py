"""Checkpoints of a run: a directory `checkpoints/step-NNNNNNN/` that is either complete or absent.

It is written under a temporary name, fsync'd and renamed; only then is `checkpoints/latest`
replaced (atomically) to name it. What the directory holds is `bigtrain.checkpoint.format`.
"""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError

from bigtrain.checkpoint import safe_load
from bigtrain.checkpoint.files import (
    checkpoint_problem,
    fsync_path,
    merge_checksum_shares,
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

    def save(self, directory: Path) -> None: ...
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
    """Write checkpoint `step` atomically, point `latest` at it, then prune the oldest. A save that
    fails (a full disk, say) removes its partial directory and leaves `latest` as it was."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if final.exists():
        raise BigtrainError(f"refusing to overwrite existing checkpoint {final}")
    try:
        if comm.is_main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save of this same step
            tmp.mkdir()
        comm.barrier()
        engine.save(tmp)  # every rank writes its own part
        torch.save(rng_state(), tmp / rng_file(comm.rank))
        comm.barrier()
        if comm.is_main:
            write_state(tmp, {"step": step, **state})
            write_config(tmp, config)
            if tokenizer is not None:
                shutil.copyfile(tokenizer, tmp / TOKENIZER)
        comm.barrier()
        write_checksum_share(tmp, comm.rank, comm.world_size)  # the ranks checksum in parallel
        comm.barrier()
        if comm.is_main:
            merge_checksum_shares(tmp, comm.world_size)
            for file in tmp.rglob("*"):
                fsync_path(file)
            fsync_path(tmp)
            check_launcher()  # an orphaned worker commits nothing
            os.rename(tmp, final)
            fsync_path(root)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors wrap OSErrors
        try:
            heartbeat.check_peers(e)  # a barrier failed because another rank died or stopped: say that
        finally:  # rank 0 alone, once the others had time to stop: a rank never pulls the directory
            if comm.is_main:  # from under another that is still writing its share
                shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(run_dir)
        kept = f"checkpoints/latest still names {latest.name}" if latest else "no checkpoint was written"
        raise BigtrainError(f"cannot save checkpoint {final}: {first_line(e)}; {kept}") from None
    if comm.is_main:
        check_launcher()
        write_latest(root, name)
        if keep_last:
            for old in sorted(root.glob("step-*"))[:-keep_last]:
                shutil.rmtree(old)
    comm.barrier()
    return final


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
