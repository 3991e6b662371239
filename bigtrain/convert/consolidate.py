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

from bigtrain.config import Config
from bigtrain.convert.progress import status, track
from bigtrain.distributed import safe_load
from bigtrain.distributed.local import param_groups
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.train.checkpoint import (
    checkpoint_config,
    read_state,
    resolve_checkpoint,
    verify_files,
)

MOMENTS = ("exp_avg", "exp_avg_sq")
SPLIT_DIM = {  # how tensor parallelism splits each weight (absent: replicated)
    "embed_tokens.weight": 0, "q_proj.weight": 0, "k_proj.weight": 0, "v_proj.weight": 0,
    "gate_proj.weight": 0, "up_proj.weight": 0, "lm_head.weight": 0,
    "o_proj.weight": 1, "down_proj.weight": 1,
}


@dataclass
class FullCheckpoint:
    path: Path
    config: Config
    state: dict[str, Any]  # state.json: step, tokens, loader, …
    weights: dict[str, torch.Tensor]  # parameter name → full fp32 tensor
    moments: dict[str, dict[str, torch.Tensor]] | None  # name → {"exp_avg", "exp_avg_sq"}; None: not read
    adam_step: torch.Tensor | None  # AdamW's step count (it skips bad steps, so may trail state["step"])


def parameter_names(cfg: Config) -> list[str]:
    """The one-process model's trainable parameters in AdamW group order (tied weights once)."""
    with torch.device("meta"):
        model = Llama(cfg.model)
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in param_groups(model, 0.0) for p in group["params"]]


def consolidate(path: str | Path) -> FullCheckpoint:
    """Read the checkpoint (or a run's latest) at `path` in whatever layout it was written."""
    checkpoint = resolve_checkpoint(path)
    verify_files(checkpoint)
    cfg = checkpoint_config(checkpoint)
    p = cfg.parallel
    try:
        with safe_load.weights_only_loads(_allowed(cfg)):
            if p.engine == "local" or not (checkpoint / "deepspeed").is_dir():
                status(f"reading {checkpoint} (single-process layout)")
                weights, moments, step = _read_single_process(checkpoint, cfg)
            elif p.tp == 1 and p.pp == 1 and p.zero_stage > 0:
                weights, moments, step = _read_zero(checkpoint / "deepspeed", cfg)
            else:
                weights, moments, step = _read_model_parallel(checkpoint / "deepspeed", cfg)
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError, pickle.UnpicklingError) as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BigtrainError(f"cannot read checkpoint {checkpoint}: {first_line}") from None
    expected = parameter_names(cfg)
    if sorted(weights) != sorted(expected):
        missing = sorted(set(expected) - set(weights))[:3]
        raise BigtrainError(f"{checkpoint} does not match its config.yaml: missing {missing or 'nothing'}, "
                            f"unexpected {sorted(set(weights) - set(expected))[:3] or 'nothing'}")
    return FullCheckpoint(checkpoint, cfg, read_state(checkpoint), weights, moments, step)


@contextlib.contextmanager
def _quiet():
    """Silence `zero_to_fp32`'s own prints and bars; `status` and `track` report instead."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _allowed(cfg: Config) -> list[type]:
    return safe_load.deepspeed_globals() if cfg.parallel.engine == "deepspeed" else []


def _read_single_process(checkpoint: Path, cfg: Config):
    """Full weights, AdamW moments (None when `optimizer.pt` is absent) and AdamW's step."""
    weights = safetensors.torch.load_file(str(checkpoint / "model.safetensors"))
    names = parameter_names(cfg)
    weights = {name: weights[name].float() for name in names if name in weights}
    if not (checkpoint / "optimizer.pt").is_file():  # weights only, e.g. made by `convert from-hf`
        return weights, None, None
    optimizer = safe_load.load(checkpoint / "optimizer.pt", map_location="cpu")
    return (weights, *torch_adam_moments(optimizer, names))


def torch_adam_moments(optimizer: dict[str, Any], names: list[str]):
    """Moments of a torch AdamW state dict whose parameter indices follow `names`."""
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


def _read_zero(ds_dir: Path, cfg: Config):
    """ZeRO-1/2/3: DeepSpeed's `zero_to_fp32` merge of every rank's fp32 partitions; the same
    merge, fed the partitions of exp_avg and exp_avg_sq, gives the moments."""
    from deepspeed.utils import zero_to_fp32 as z

    status(f"merging ZeRO-{cfg.parallel.zero_stage} partitions of {ds_dir}")
    with _quiet():  # zero_to_fp32 prints its own progress
        model_states = z.parse_model_states(z.get_model_state_files(str(ds_dir)))
        zero_stage, world, fp32_groups, paddings = z.parse_optim_states(z.get_optim_files(str(ds_dir)), str(ds_dir))
    optim = [safe_load.load(f, map_location="cpu")["optimizer_state_dict"]
             for f in track(z.get_optim_files(str(ds_dir)), "reading optimizer shards")]

    def merge(flat_groups: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        with _quiet():
            if zero_stage <= 2:
                merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)
            else:
                merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False)
            return {k: v.float() for k, v in z.to_torch_tensor(merged).items()}

    names = set(parameter_names(cfg))
    weights = {k: v for k, v in merge(fp32_groups).items() if k in names}
    inner = "base_optimizer_state" if zero_stage <= 2 else "optimizer_state_dict"
    states = [o[inner]["state"] for o in optim]
    per_moment = {m: merge([[s[g][m] for g in sorted(s)] for s in states]) for m in MOMENTS}
    moments = {name: {m: per_moment[m][name] for m in MOMENTS} for name in weights}
    return weights, moments, states[0][0]["step"]


def _read_model_parallel(ds_dir: Path, cfg: Config):
    """Tensor/pipeline-parallel (or plain) DeepSpeed checkpoints: per (stage, tp rank) weights from
    the layer or model files, AdamW state from the model files (ZeRO 0; under ZeRO-1 weights only)."""
    from deepspeed.runtime.utils import partition_balanced

    p = cfg.parallel
    status(f"joining {p.pp} pipeline stage(s) × {p.tp} tensor-parallel rank(s) of {ds_dir}")
    n = cfg.model.n_layers
    parts = partition_balanced(weights=[0] + [1] * n + [0], num_parts=p.pp) if p.pp > 1 else [0, n + 2]
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
        if p.zero_stage > 0:  # ZeRO-1 partitions under tensor/pipeline parallelism: weights only
            continue
        local_moments, local_step = torch_adam_moments(model_file["optimizer"], names)
        step = local_step if local_step is not None else step
        for name, ms in local_moments.items():
            for m in MOMENTS:
                moment_shards.setdefault(name, {}).setdefault(m, []).append(ms[m])
    weights = {name: _join(name, parts_) for name, parts_ in shards.items()}
    if p.zero_stage > 0:
        return weights, None, None
    moments = {name: {m: _join(name, ms[m]) for m in MOMENTS} for name, ms in moment_shards.items()}
    return weights, moments, step


def _join(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dim = SPLIT_DIM.get(name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1])
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
