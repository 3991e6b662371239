"""Change a checkpoint's parallel layout: consolidate it, then write it for the new layout with its
AdamW moments, step counters, data-loader position and RNG state, so training continues as if the
layout had never changed.

The written layout is the single-process one (the local engine's `model.safetensors` +
`optimizer.pt`), which is what `parallel.tp=1 parallel.pp=1` asks for.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import safetensors.torch
import torch

from bigtrain.config import load_config, save_config
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
    p = cfg.parallel
    if p.tp != 1 or p.pp != 1 or p.engine != "local":
        raise BigtrainError("convert reshard writes the single-process layout: pass parallel.engine=local "
                            "parallel.tp=1 parallel.pp=1 (and parallel.zero_stage=0)")
    check_layout(cfg, world_size=1)
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
        status(f"writing {out} for parallel.engine=local (from {_layout(full.config)})")
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "optimizer.pt")
        save_config(cfg, tmp / "config.yaml")
        for name in (STATE, "tokenizer.json", "rng-0.pt"):
            if (full.path / name).is_file():
                shutil.copyfile(full.path / name, tmp / name)
        write_file_list(tmp)
    return out


def _layout(cfg) -> str:
    p = cfg.parallel
    return "the local engine" if p.engine == "local" else f"DeepSpeed ZeRO-{p.zero_stage}, tp={p.tp}, pp={p.pp}"
