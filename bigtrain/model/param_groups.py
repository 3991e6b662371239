"""Which parameters AdamW decays: one rule, shared by the optimizer every engine builds and by the
checkpoint format, which indexes `optimizer.pt` in this order."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, the norm weights (the model's only vectors) do not, told by
    name, as a ZeRO-3 partition's shape says nothing. Their order is the order of `optimizer.pt`
    (`bigtrain.checkpoint.format.parameter_names`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("norm.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_scaled_groups(groups: list[dict], model: nn.Module, lr_multiplier: Callable[[str], float]) -> list[dict]:
    """`groups` cut into runs of consecutive parameters with the same `lr_multiplier(name)`, each run
    marked `lr_scale` (engines set a group's lr to the schedule's times its `lr_scale`). The
    parameters keep their order, so `optimizer.pt` indexes them as before; names are told by the
    suffix, so a tensor-parallel shard, a pipeline stage or a ZeRO partition scales as the whole."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = []
    for group in groups:
        runs: list[dict] = []
        for p in group["params"]:
            scale = lr_multiplier(names[id(p)])
            if not runs or runs[-1]["lr_scale"] != scale:
                runs.append({**group, "params": [], "lr_scale": scale})
            runs[-1]["params"].append(p)
        out.extend(runs or [group])
    return out
