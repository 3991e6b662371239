"""Change a checkpoint's parallel layout: consolidate it, then write it for the new layout with its
AdamW moments, step counters, data-loader position and RNG state, so training continues as if the
layout had never changed.

Every target is written in one interchange format, the single-process layout (`model.safetensors`
+ `optimizer.pt`: full weights, per-parameter moments, AdamW's step) with the target's
`config.yaml`. The local engine loads it as its own; a DeepSpeed engine of any ZeRO stage, tensor
and pipeline split slices and partitions it at resume (`bigtrain.engine.deepspeed.full_state`), and its
next save is in DeepSpeed's own format again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.files import write_file_list
from bigtrain.checkpoint.io import open_checkpoint
from bigtrain.config import load_config
from bigtrain.convert.consolidate import consolidate
from bigtrain.convert.output import output_dir, refuse_existing
from bigtrain.convert.progress import status
from bigtrain.engine.optimizer import build_adamw
from bigtrain.errors import BigtrainError
from bigtrain.model import Llama
from bigtrain.parallel.layout import check_layout, describe, world_size_for


def reshard(checkpoint: str | Path, out: str | Path, overrides: list[str], overwrite: bool = False) -> Path:
    """Write `checkpoint` laid out for its config plus `overrides` (e.g. `parallel.tp=1`) to `out`."""
    out = Path(out)
    refuse_existing(out, overwrite)
    source = open_checkpoint(checkpoint, checksums=False)  # sizes, format
    cfg = load_config(source / fmt.CONFIG, list(overrides), saved=True)
    check_layout(cfg, world_size=world_size_for(cfg))
    if "muon" in (cfg.train.optimizer, fmt.read_config(source).train.optimizer):
        raise BigtrainError("convert reshard carries AdamW state only, not Muon's: resume a Muon run in the layout "
                            "that wrote it, or start anew from its weights with model.init_from")
    full = consolidate(checkpoint)
    if full.moments is None:
        raise BigtrainError(f"{full.path} holds no readable AdamW state (a weights-only checkpoint, or ZeRO-1 "
                            "under tensor/pipeline parallelism); use it with model.init_from or convert to-hf")
    if cfg.model != full.config.model:
        raise BigtrainError("convert reshard changes the layout, not the model: drop the model.* overrides")
    model = Llama(cfg.model)
    model.load_state_dict(full.weights, strict=False)
    optimizer = build_adamw(model, cfg.train)  # the local engine's own, so its options load unchanged
    state = fmt.adamw_state(optimizer, fmt.parameter_names(cfg), full.moments, full.adam_step)
    with output_dir(out, overwrite) as tmp:
        status(f"writing {out} for {describe(cfg)} (from {describe(full.config)})")
        fmt.save_weights(model, tmp)
        torch.save(state, tmp / fmt.OPTIMIZER)
        fmt.write_config(tmp, cfg)
        for name in (fmt.STATE, fmt.TOKENIZER, fmt.rng_file(0)):
            if (full.path / name).is_file():
                shutil.copyfile(full.path / name, tmp / name)
        write_file_list(tmp)
    return out
