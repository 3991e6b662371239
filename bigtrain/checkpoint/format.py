"""The checkpoint format: the files of a checkpoint directory and what gives each its meaning.

    state.json          step, tokens, data-loader position, counters, W&B id, `format_version`
    config.yaml         the resolved config of the run that wrote it
    tokenizer.json      the tokenizer the data was prepared with (when known)
    files.json          every file's size, written last
    rng-<rank>.pt       each rank's RNG states
    model.safetensors   full fp32 weights, named as in the one-process `Llama` (the single-process
                        layout; DeepSpeed runs without tensor/pipeline split write it too)
    optimizer.pt        torch AdamW `state_dict()` whose parameter indices follow `parameter_names`
    deepspeed/          DeepSpeed's own sharded engine state (DeepSpeed runs only)

The engines write the tensors; `bigtrain.checkpoint.io` makes the directory atomic. Tensors load
with `weights_only=True` and metadata is JSON, so reading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from bigtrain import compat
from bigtrain.checkpoint import safe_load
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import Config, load_config, save_config
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.model.param_groups import param_groups

FORMAT_VERSION = 1  # state.json of checkpoints written before versions were recorded counts as 1
STATE, CONFIG, TOKENIZER, FILES = "state.json", "config.yaml", "tokenizer.json", "files.json"
WEIGHTS, OPTIMIZER, DEEPSPEED = "model.safetensors", "optimizer.pt", "deepspeed"
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state besides its step


def rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def write_state(checkpoint: Path, state: dict[str, Any]) -> None:
    (checkpoint / STATE).write_text(json.dumps({"format_version": FORMAT_VERSION, **state}, indent=1))


def format_problem(checkpoint: Path) -> str | None:
    """Why this bigtrain cannot read `checkpoint`'s format (None: it can)."""
    try:
        version = json.loads((checkpoint / STATE).read_text()).get("format_version", 1)
    except (OSError, ValueError) as e:
        return f"{checkpoint} has no readable {STATE} ({e.__class__.__name__}): it is not a complete checkpoint"
    if version != FORMAT_VERSION:
        return (f"{checkpoint} has checkpoint format_version {version}; this bigtrain reads version "
                f"{FORMAT_VERSION} (use the bigtrain that wrote it, or convert it there)")
    return None


def read_state(checkpoint: Path) -> dict[str, Any]:
    """`state.json`; a format this version of bigtrain does not know is refused in one line."""
    problem = format_problem(checkpoint)
    if problem:
        raise BigtrainError(problem)
    return json.loads((checkpoint / STATE).read_text())


def write_config(checkpoint: Path, config: Config) -> None:
    save_config(config, checkpoint / CONFIG)


def read_config(checkpoint: Path) -> Config:
    """The run's config as the checkpoint saved it (keys renamed since then read under their new names)."""
    return load_config(checkpoint / CONFIG, saved=True)


def parameter_names(cfg: Config) -> list[str]:
    """The one-process model's trainable parameters in the order `optimizer.pt` indexes them:
    AdamW's `param_groups` order (tied weights once)."""
    with torch.device("meta"):
        model = Llama(cfg.model)
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]


def save_weights(model: nn.Module, checkpoint: Path, writes: Direct | None = None) -> None:
    """`model.safetensors` as `safetensors.torch.save_model` writes it (tied weights once, the
    dropped names in the metadata, as `load_model` expects), through `writes`."""
    tensors, metadata = model.state_dict(), {}
    for kept, dropped in compat.shared_tensor_names(tensors).items():
        for name in dropped:
            metadata[name] = kept
            del tensors[name]
    (writes or Direct()).safetensors(tensors, checkpoint / WEIGHTS, metadata or None)


def load_weights(model: nn.Module, checkpoint: Path) -> None:
    """Load `model.safetensors` of `checkpoint` into `model` (strict)."""
    missing, unexpected = safetensors.torch.load_model(model, str(checkpoint / WEIGHTS), strict=False)
    if missing or unexpected:
        raise BigtrainError(f"{checkpoint} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def save_optimizer(optimizer: torch.optim.Optimizer, checkpoint: Path, writes: Direct | None = None) -> None:
    (writes or Direct()).torch_save(optimizer.state_dict(), checkpoint / OPTIMIZER)


def load_optimizer(checkpoint: Path, **kwargs: Any) -> dict[str, Any]:
    return safe_load.load(checkpoint / OPTIMIZER, **kwargs)


def adamw_moments(optimizer: dict[str, Any], names: list[str]):
    """Per-name moments and AdamW's step from an AdamW state dict whose parameter indices follow
    `names`; parameters never updated have no entry, and the step is None before any update."""
    indices = [i for group in optimizer["param_groups"] for i in group["params"]]
    if len(indices) != len(names):
        raise ValueError(f"optimizer state holds {len(indices)} parameters, the model {len(names)}")
    moments, step = {}, None
    for index, name in zip(indices, names, strict=True):
        state = optimizer["state"].get(index)
        if state:  # absent before the first update
            moments[name] = {m: state[m].float() for m in MOMENTS}
            step = state["step"]
    return moments, step


def adamw_state(optimizer: torch.optim.Optimizer, names: list[str], moments: dict[str, dict[str, torch.Tensor]],
                step: torch.Tensor) -> dict[str, Any]:
    """`optimizer.state_dict()` (AdamW over the one-process model) filled with `moments` and `step`."""
    state = optimizer.state_dict()
    state["state"] = {
        index: {"step": step.float().clone(), **{m: moments[name][m] for m in MOMENTS}}
        for index, name in enumerate(names) if name in moments
    }
    return state
