"""The optimizer every engine trains with (DeepSpeed wraps the same torch optimizer): torch's AdamW,
or Muon for the hidden matrices with AdamW for the rest (`train.optimizer`, `engine/muon.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigtrain.config import TrainConfig
from bigtrain.model.param_groups import param_groups

ADAMW_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_adamw(model: nn.Module, cfg: TrainConfig, regroup: Callable[[list[dict]], list[dict]] | None = None
                ) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups` (passed through `regroup` when given), with the kernel
    `train.adamw_impl` names."""
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(regroup(groups) if regroup else groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **ADAMW_KERNELS[cfg.adamw_impl])


def build_optimizer(model: nn.Module, cfg: TrainConfig, regroup: Callable[[list[dict]], list[dict]] | None = None,
                    names: dict[int, str] | None = None, tp_group: Any = None) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names: `build_adamw`'s, or Muon over the same groups (`names`:
    `id(param)` → one-process name where `model` names differ; `tp_group` under tensor parallelism)."""
    if cfg.optimizer == "adamw":
        return build_adamw(model, cfg, regroup)
    from bigtrain.engine.muon import build_muon
    groups = param_groups(model, cfg.weight_decay)
    return build_muon(model, regroup(groups) if regroup else groups, cfg, ADAMW_KERNELS[cfg.adamw_impl], names, tp_group)
