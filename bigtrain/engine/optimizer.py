"""The AdamW every engine trains with (DeepSpeed wraps the same torch optimizer)."""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import TrainConfig
from bigtrain.model.param_groups import param_groups

ADAMW_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`, with the kernel `train.adamw_impl` names."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **ADAMW_KERNELS[cfg.adamw_impl])
