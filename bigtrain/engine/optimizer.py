"""The AdamW every engine trains with (DeepSpeed wraps the same torch optimizer)."""

from __future__ import annotations

from collections.abc import Callable

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
