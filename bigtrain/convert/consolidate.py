"""Any bigtrain checkpoint as full fp32 weights and AdamW moments, named as in the one-process model.

Layouts: the single-process files (`model.safetensors` + `optimizer.pt`, no `deepspeed/`: the
local engine's, or what `convert reshard` wrote for any layout); DeepSpeed ZeRO-1/2/3 without
tensor or pipeline split, merged by DeepSpeed's own `zero_to_fp32` (its merge is reused for the
Adam moments); and DeepSpeed tensor/pipeline-parallel checkpoints (ZeRO 0 or 1), whose per-layer
shards are joined along the dimension each Megatron-style layer splits.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError

from bigtrain import compat
from bigtrain.checkpoint import safe_load
from bigtrain.checkpoint.format import (
    DEEPSPEED,
    MOMENTS,
    OPTIMIZER,
    WEIGHTS,
    adamw_moments,
    load_optimizer,
    parameter_names,
    read_config,
    read_state,
)
from bigtrain.checkpoint.io import load_trained_model, open_checkpoint, resolve_checkpoint
from bigtrain.config import Config
from bigtrain.convert.progress import status, track
from bigtrain.errors import BigtrainError, first_line
from bigtrain.model import Llama
from bigtrain.parallel.layout import stage_bounds, tp_join


@dataclass
class FullCheckpoint:
    path: Path
    config: Config
    state: dict[str, Any]  # state.json: step, tokens, loader, …
    weights: dict[str, torch.Tensor]  # parameter name → full fp32 tensor
    moments: dict[str, dict[str, torch.Tensor]] | None  # name → {"exp_avg", "exp_avg_sq"}; None: not read
    adam_step: torch.Tensor | None  # AdamW's step count (it skips bad steps, so may trail state["step"])


def consolidate(path: str | Path, moments: bool = True) -> FullCheckpoint:
    """Read the checkpoint (or a run's latest) at `path` in whatever layout it was written;
    `moments=False` reads the weights alone (no AdamW state: less memory, less time)."""
    checkpoint = open_checkpoint(path)
    state = read_state(checkpoint)
    cfg = read_config(checkpoint)
    p = cfg.parallel
    try:
        with safe_load.weights_only_loads(_allowed(cfg)):
            if p.engine == "local" or not (checkpoint / DEEPSPEED).is_dir():
                status(f"reading {checkpoint} (single-process layout)")
                weights, adam, step = _read_single_process(checkpoint, cfg, moments)
            elif p.tp == 1 and p.pp == 1 and p.zero_stage > 0:
                weights, adam, step = _read_zero(checkpoint / DEEPSPEED, cfg, moments)
            else:
                weights, adam, step = _read_model_parallel(checkpoint / DEEPSPEED, cfg, moments)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        raise BigtrainError(f"cannot read checkpoint {checkpoint}: {first_line(e)}") from None
    expected = parameter_names(cfg)
    if sorted(weights) != sorted(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        raise BigtrainError(f"{checkpoint} does not match its config.yaml: missing {missing or 'nothing'}, "
                            f"unexpected {sorted(set(weights) - set(expected))[:3] or 'nothing'}")
    return FullCheckpoint(checkpoint, cfg, state, weights, adam, step)


def load_full_model(path: str | Path, device: torch.device) -> tuple[Llama, Config, Path]:
    """The one-process model of a checkpoint (or a run's latest) of any layout, in eval mode:
    read directly when it holds full weights, else consolidated (weights only)."""
    checkpoint = resolve_checkpoint(path)  # each branch opens (checks) it
    if (checkpoint / WEIGHTS).is_file():
        model, cfg, checkpoint = load_trained_model(checkpoint, device)
        return model, cfg, checkpoint
    full = consolidate(checkpoint, moments=False)
    model = Llama(full.config.model)
    model.load_state_dict(full.weights, strict=False)  # a tied head is the embedding, not a weight of its own
    return model.to(device).eval(), full.config, full.path


@contextlib.contextmanager
def _quiet():
    """Silence `zero_to_fp32`'s own prints and bars; `status` and `track` report instead."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _allowed(cfg: Config) -> list[type]:
    return safe_load.deepspeed_globals() if cfg.parallel.engine == "deepspeed" else []


def _read_single_process(checkpoint: Path, cfg: Config, moments: bool = True):
    """Full weights, AdamW moments (None when `optimizer.pt` is absent) and AdamW's step."""
    weights = safetensors.torch.load_file(str(checkpoint / WEIGHTS))
    names = parameter_names(cfg)
    weights = {name: weights[name].float() for name in names if name in weights}
    if not moments or not (checkpoint / OPTIMIZER).is_file():  # weights only, e.g. made by `convert from-hf`
        return weights, None, None
    return (weights, *adamw_moments(load_optimizer(checkpoint, map_location="cpu"), names))


def _read_zero(ds_dir: Path, cfg: Config, moments: bool = True):
    """ZeRO-1/2/3: DeepSpeed's `zero_to_fp32` merge of every rank's fp32 partitions; the same
    merge, fed the partitions of exp_avg and exp_avg_sq, gives the moments."""
    status(f"merging ZeRO-{cfg.parallel.zero_stage} partitions of {ds_dir}")
    with _quiet():  # zero_to_fp32 prints its own progress
        zero_stage, world, fp32_groups, paddings, model_states, optim_files = compat.read_zero_checkpoint(str(ds_dir))
    optim = [safe_load.load(f, map_location="cpu")["optimizer_state_dict"]
             for f in track(optim_files, "reading optimizer shards")] if moments else []

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        with _quiet():
            merged = compat.merge_zero_partitions(zero_stage, world, flat_groups, model_states, paddings)
        return {k: v.float() for k, v in merged.items()}

    names = set(parameter_names(cfg))
    weights = {k: v for k, v in merge(fp32_groups).items() if k in names}
    if not moments:
        return weights, None, None
    inner = "base_optimizer_state" if zero_stage <= 2 else "optimizer_state_dict"
    states = [o[inner]["state"] for o in optim]
    per_moment = {m: merge([[s[g][m] for g in sorted(s)] for s in states]) for m in MOMENTS}
    adam = {name: {m: per_moment[m][name] for m in MOMENTS} for name in weights}
    return weights, adam, states[0][0]["step"]


def _read_model_parallel(ds_dir: Path, cfg: Config, moments: bool = True):
    """Tensor/pipeline-parallel (or plain) DeepSpeed checkpoints: per (stage, tp rank) weights from
    the layer or model files, AdamW state from the model files (ZeRO 0; under ZeRO-1 weights only)."""
    p = cfg.parallel
    status(f"joining {p.pp} pipeline stage(s) × {p.tp} tensor-parallel rank(s) of {ds_dir}")
    parts = stage_bounds(cfg.model.n_layers, p.pp)
    shards: dict[str, list[torch.Tensor]] = {}
    moment_shards: dict[str, dict[str, list[torch.Tensor]]] = {}
    step = None
    for mp_rank in track(range(p.pp * p.tp), "reading model-parallel shards"):
        stage, tp_rank = divmod(mp_rank, p.tp)
        model_file = safe_load.load(ds_dir / f"mp_rank_{mp_rank:02d}_model_states.pt", map_location="cpu")
        if p.pp > 1:
            suffix = f"-model_{tp_rank:02d}" if p.tp > 1 else ""
            local: dict[str, torch.Tensor] = {}
            for layer in range(parts[stage], parts[stage + 1]):
                layer_file = ds_dir / f"layer_{layer:02d}{suffix}-model_states.pt"
                for key, value in safe_load.load(layer_file, map_location="cpu").items():
                    local[f"layers.{layer}.{key}"] = value
        else:
            local = dict(model_file["module"])
        names = [k for k in local if not (cfg.model.tie_embeddings and k.endswith("lm_head.weight"))]
        names = [k for k in names if local[k].dim() >= 2] + [k for k in names if local[k].dim() < 2]
        for name in names:
            shards.setdefault(name, []).append(local[name].float())
        if p.zero_stage > 0 or not moments:  # ZeRO-1 partitions under tensor/pipeline parallelism: weights only
            continue
        local_moments, local_step = adamw_moments(model_file["optimizer"], names)
        step = local_step if local_step is not None else step
        for name, ms in local_moments.items():
            for m in MOMENTS:
                moment_shards.setdefault(name, {}).setdefault(m, []).append(ms[m])
    weights = {name: tp_join(name, parts_) for name, parts_ in shards.items()}
    if p.zero_stage > 0 or not moments:
        return weights, None, None
    adam = {name: {m: tp_join(name, ms[m]) for m in MOMENTS} for name, ms in moment_shards.items()}
    return weights, adam, step
