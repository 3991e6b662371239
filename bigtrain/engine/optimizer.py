"""The optimizer every engine trains with (DeepSpeed wraps the same torch optimizer): torch's AdamW,
or Muon for the hidden matrices with AdamW for the rest (`train.optimizer`, `engine/muon.py`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigtrain.config import ModelConfig, TrainConfig
from bigtrain.model import mup
from bigtrain.model.param_groups import lr_scaled_groups, param_groups

ADAMW_KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


def build_adamw(model: nn.Module, cfg: TrainConfig, regroup: Callable[[list[dict]], list[dict]] | None = None,
                model_cfg: ModelConfig | None = None) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups` (with µP's learning rates when `model_cfg`, default the
    model's own `cfg`, asks for them; passed through `regroup` when given), with the kernel
    `train.adamw_impl` names."""
    groups = mup_lr_groups(model, param_groups(model, cfg.weight_decay), model_cfg or getattr(model, "cfg", None))
    return torch.optim.AdamW(regroup(groups) if regroup else groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **ADAMW_KERNELS[cfg.adamw_impl])


def mup_lr_groups(model: nn.Module, groups: list[dict], model_cfg: ModelConfig | None) -> list[dict]:
    """Under µP (`model.parametrization: mup`), `groups` split by each parameter's learning-rate
    multiplier (`bigtrain.model.mup.lr_multiplier`: 1/m for hidden matrices); otherwise unchanged.
    Decoupled weight decay follows the scaled lr (lr/m · wd), as in Megatron-Core's µP."""
    if model_cfg is None or model_cfg.parametrization != "mup":
        return groups
    return lr_scaled_groups(groups, model, lambda name: mup.lr_multiplier(model_cfg, name))


def scheduled_lr(group: dict, lr: float) -> float:
    """A parameter group's learning rate at the schedule's `lr` (µP groups carry an `lr_scale`)."""
    return lr * group.get("lr_scale", 1.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig, regroup: Callable[[list[dict]], list[dict]] | None = None,
                    names: dict[int, str] | None = None, tp_group: Any = None,
                    model_cfg: ModelConfig | None = None) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names: `build_adamw`'s, or Muon over the same groups (`names`:
    `id(param)` → one-process name where `model` names differ; `tp_group` under tensor parallelism).
    Under µP each Muon group keeps its group's `lr_scale` (Muon's update has AdamW's RMS, so µP's
    AdamW rule is applied as it is; not measured)."""
    if cfg.optimizer == "adamw":
        return build_adamw(model, cfg, regroup, model_cfg)
    from bigtrain.engine.muon import build_muon
    groups = mup_lr_groups(model, param_groups(model, cfg.weight_decay), model_cfg or getattr(model, "cfg", None))
    return build_muon(model, regroup(groups) if regroup else groups, cfg, ADAMW_KERNELS[cfg.adamw_impl], names, tp_group)
