"""The AdamW every engine trains with (DeepSpeed wraps the same torch optimizer)."""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import TrainConfig

ADAMW_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norm weights) do not. Their order is the order of
    `optimizer.pt` (see `bigtrain.distributed.checkpoint_format.parameter_names`)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`, with the kernel `train.adamw_impl` names."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **ADAMW_KERNELS[cfg.adamw_impl])
