"""Change a checkpoint's parallel layout: consolidate it, then write it for the new layout with its
AdamW moments, step counters, data-loader position and RNG state, so training continues as if the
layout had never changed.

Every target is written in one interchange format, the single-process layout (`model.safetensors`
+ `optimizer.pt`: full weights, per-parameter moments, AdamW's step) with the target's
`config.yaml`. The local engine loads it as its own; a DeepSpeed engine of any ZeRO stage, tensor
and pipeline split slices and partitions it at resume (`bigtrain.distributed.full_state`), and its
next save is in DeepSpeed's own format again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch

from bigtrain.config import Config, load_config, save_config
from bigtrain.convert.consolidate import MOMENTS, consolidate, parameter_names
from bigtrain.convert.output import output_dir, refuse_existing
from bigtrain.convert.progress import status
from bigtrain.distributed.local import build_adamw
from bigtrain.distributed.topology import check_layout
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.train.checkpoint import STATE, resolve_checkpoint, write_file_list


def reshard(checkpoint: str | Path, out: str | Path, overrides: list[str], overwrite: bool = False) -> Path:
    """Write `checkpoint` laid out for its config plus `overrides` (e.g. `parallel.tp=1`) to `out`."""
    out = Path(out)
    refuse_existing(out, overwrite)
    cfg = load_config(resolve_checkpoint(checkpoint) / "config.yaml", list(overrides))
    check_layout(cfg, world_size=_world_size(cfg))
    full = consolidate(checkpoint)
    if full.moments is None:
        raise BigtrainError(f"{full.path} holds no readable AdamW state (a weights-only checkpoint, or ZeRO-1 "
                            "under tensor/pipeline parallelism); use it with model.init_from or convert to-hf")
    if cfg.model != full.config.model:
        raise BigtrainError("convert reshard changes the layout, not the model: drop the model.* overrides")
    model = Llama(cfg.model)
    model.load_state_dict(full.weights, strict=False)
    optimizer = build_adamw(model, cfg.train)  # the local engine's own, so its options load unchanged
    state = optimizer.state_dict()
    state["state"] = {
        index: {"step": full.adam_step.float().clone(), **{m: full.moments[name][m] for m in MOMENTS}}
        for index, name in enumerate(parameter_names(cfg)) if name in full.moments
    }
    with output_dir(out, overwrite) as tmp:
        status(f"writing {out} for {_layout(cfg)} (from {_layout(full.config)})")
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "optimizer.pt")
        save_config(cfg, tmp / "config.yaml")
        for name in (STATE, "tokenizer.json", "rng-0.pt"):
            if (full.path / name).is_file():
                shutil.copyfile(full.path / name, tmp / name)
        write_file_list(tmp)
    return out


def _world_size(cfg: Config) -> int:
    """The processes the target layout runs on: tp × pp × the dp that train.global_batch implies."""
    p, per_replica, batch = cfg.parallel, cfg.data.micro_batch * cfg.train.grad_accum, cfg.train.global_batch
    if p.engine == "local":
        return 1
    return p.tp * p.pp * (batch // per_replica if batch and batch % per_replica == 0 else 1)


def _layout(cfg: Config) -> str:
    p = cfg.parallel
    return "the local engine" if p.engine == "local" else f"DeepSpeed ZeRO-{p.zero_stage}, tp={p.tp}, pp={p.pp}"
