"""Checkpoints: a directory `checkpoints/step-NNNNNNN/` that is either complete or absent.

It is written under a temporary name, fsync'd and renamed; only then is `checkpoints/latest`
replaced (atomically) to name it. Metadata is JSON and tensors load with `weights_only=True`, so
loading never runs pickled code.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError

from bigtrain.config import Config, ModelConfig, load_config, save_config
from bigtrain.distributed import safe_load
from bigtrain.distributed.local import load_weights
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama

STATE = "state.json"
FILES = "files.json"  # every file's size, to refuse truncated or missing files before loading
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "ffn_dim", "tie_embeddings")


class Engine(Protocol):
    rank: int
    is_main: bool

    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...
    def barrier(self) -> None: ...


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/latest` names, or None when the run has none yet."""
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    return checkpoint_root(run_dir) / pointer.read_text().strip()


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (meaning its latest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise BigtrainError(f"checkpoint not found: {path}")
    if (path / STATE).is_file():
        return path
    for run_dir in (path, path.parent):
        latest = latest_checkpoint(run_dir)
        if latest is not None and (latest / STATE).is_file():
            return latest
    raise BigtrainError(f"{path} is neither a checkpoint nor a run directory with checkpoints/latest")


def save_checkpoint(
    run_dir: Path, step: int, engine: Engine, state: dict[str, Any], config: Config,
    tokenizer: Path | None, keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, then prune the oldest."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if final.exists():
        raise BigtrainError(f"refusing to overwrite existing checkpoint {final}")
    if engine.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed save of this same step
        tmp.mkdir()
    engine.barrier()
    engine.save(tmp)  # every rank writes its own part
    torch.save(rng_state(), tmp / f"rng-{engine.rank}.pt")
    engine.barrier()
    if engine.is_main:
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=1))
        save_config(config, tmp / "config.yaml")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        write_file_list(tmp)
        for file in tmp.rglob("*"):
            _fsync(file)
        _fsync(tmp)
        os.rename(tmp, final)
        _fsync(root)
        pointer_tmp = root / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        _fsync(pointer_tmp)
        os.replace(pointer_tmp, root / "latest")
        _fsync(root)
        if keep_last:
            for old in sorted(root.glob("step-*"))[:-keep_last]:
                shutil.rmtree(old)
    engine.barrier()
    return final


def load_checkpoint(checkpoint: Path, engine: Engine) -> dict[str, Any]:
    """Restore engine and RNG state; return the JSON state (step, tokens, loader, …)."""
    verify_files(checkpoint)
    try:
        engine.load(checkpoint)
        rng_file = checkpoint / f"rng-{engine.rank}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than saved
            set_rng_state(safe_load.load(rng_file))
    except (pickle.UnpicklingError, RuntimeError, OSError, SafetensorError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BigtrainError(f"cannot load checkpoint {checkpoint}: {first_line}") from None
    return read_state(checkpoint)


def write_file_list(checkpoint: Path) -> None:
    """Record every file's size in `files.json` (written last, before the directory is renamed)."""
    sizes = {str(f.relative_to(checkpoint)): f.stat().st_size for f in sorted(checkpoint.rglob("*")) if f.is_file()}
    (checkpoint / FILES).write_text(json.dumps(sizes, indent=0))


def verify_files(checkpoint: Path) -> None:
    """Refuse a checkpoint with a missing or truncated file (against the sizes it was saved with)."""
    if not (checkpoint / FILES).is_file():
        return  # written before checkpoints listed their files
    for name, size in json.loads((checkpoint / FILES).read_text()).items():
        file = checkpoint / name
        if not file.is_file():
            raise BigtrainError(f"checkpoint {checkpoint} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise BigtrainError(f"checkpoint {checkpoint} is damaged: {name} has {file.stat().st_size} bytes, "
                                f"{size} were written")


def check_same_model(checkpoint: Path, model: ModelConfig) -> None:
    """Refuse a checkpoint whose model shape differs from `model`, naming the first differing key."""
    saved = checkpoint_config(checkpoint).model
    for key in SHAPE_KEYS:
        if getattr(saved, key) != getattr(model, key):
            raise BigtrainError(
                f"{checkpoint} holds a model with model.{key}={getattr(saved, key)}, "
                f"but the config has model.{key}={getattr(model, key)}"
            )


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE).read_text())


def checkpoint_config(checkpoint: Path) -> Config:
    return load_config(checkpoint / "config.yaml")


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def initial_weights_file(path: str | Path, model: ModelConfig) -> Path:
    """The checked `model.safetensors` of checkpoint `path` (or a run's latest) for `model.init_from`."""
    checkpoint = resolve_checkpoint(path)
    verify_files(checkpoint)
    check_same_model(checkpoint, model)
    if not (checkpoint / "model.safetensors").exists():
        raise BigtrainError(f"{checkpoint} holds only tensor/pipeline-parallel shards; "
                            "run bigtrain convert reshard first")
    return checkpoint / "model.safetensors"


def load_initial_weights(model: Llama, path: str | Path) -> None:
    """Load the full weights of checkpoint `path` (or a run's latest) into `model` (`model.init_from`)."""
    checkpoint = initial_weights_file(path, model.cfg).parent
    try:
        load_weights(model, checkpoint)
    except (OSError, SafetensorError) as e:
        raise BigtrainError(f"cannot load weights from {checkpoint}: {e}") from None


def load_trained_model(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, Config, Path]:
    """Rebuild the model of a checkpoint (or a run's latest) for evaluation or generation."""
    checkpoint = resolve_checkpoint(path)
    verify_files(checkpoint)
    config = checkpoint_config(checkpoint)
    model = Llama(config.model)
    if not (checkpoint / "model.safetensors").exists():
        raise BigtrainError(
            f"{checkpoint} holds only tensor/pipeline-parallel DeepSpeed shards (no model.safetensors); "
            "evaluate during training with data.val_path"
        )
    try:
        load_weights(model, checkpoint)
    except OSError as e:
        raise BigtrainError(f"cannot load weights from {checkpoint}: {e}") from None
    return model.to(device).eval(), config, checkpoint
