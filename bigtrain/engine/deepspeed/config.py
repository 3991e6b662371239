"""The DeepSpeed JSON config, derived from the bigtrain config (plus an optional user override)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bigtrain.config import Config
from bigtrain.engine.device import pick_device, resolve_precision
from bigtrain.errors import BigtrainError
from bigtrain.parallel.layout import global_batch
from bigtrain.parallel.planner import zero_communication


def deepspeed_config(cfg: Config, dp: int) -> dict[str, Any]:
    """ZeRO stage, batch sizes, clipping and precision; `parallel.deepspeed_overrides` merged last."""
    p, t = cfg.parallel, cfg.train
    precision = resolve_precision(t.precision, pick_device(t.device), "deepspeed")
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage > 0:
        zero.update({"contiguous_gradients": True, "reduce_scatter": True})
        zero.update(zero_communication(cfg.model, p.zero_stage, dp, p.tp))
    if p.offload_optimizer:
        if p.zero_stage == 0:
            raise BigtrainError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_batch_size": global_batch(cfg, dp),
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip or 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW, the same update as the local engine
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_overrides:
        path = Path(p.deepspeed_overrides)
        try:
            overrides = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BigtrainError(f"parallel.deepspeed_overrides: cannot read {path}: {e}") from None
        config = merge(config, overrides)
    return config


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values in `extra` win, nested sections are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
