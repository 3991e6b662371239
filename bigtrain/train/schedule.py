"""Learning-rate schedules: linear warmup, then cosine, linear or constant decay to a floor."""

from __future__ import annotations

import math

from bigtrain.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for update number `step` (0-based) out of `cfg.steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - floor) * progress
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
