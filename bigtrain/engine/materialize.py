"""Give a rank's layers, built on the meta device, their values: only this rank's tensors, on
its device, each parameter seeded by (run seed, its name) or read from `model.init_from`.

`parallelize` calls it on each layer once tensor parallelism has cut the layer's shapes, so only
the rank's slice of a split weight is ever kept (its full initial value exists for one parameter
at a time; an `init_from` file is read slice by slice). The blocks share one pair of RoPE tables.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.checkpoint.initial_weights import InitialWeights
from bigtrain.config import ModelConfig
from bigtrain.model.llama import Block, Llama, initial_value, materialize, rope_tables
from bigtrain.parallel.layout import is_expert_weight, tp_split_dim


class Materializer:
    """`materialize(layer, index)` for `parallelize`: layer `index` of the model's list, split
    across `tp_group` and its experts across `ep_group` (None: whole), gets its parameters and the
    shared RoPE tables on `device`."""

    def __init__(self, cfg: ModelConfig, device: torch.device, seed: int, init_file: Path | None = None,
                 tp_group: dist.ProcessGroup | None = None, ep_group: dist.ProcessGroup | None = None):
        self.cfg, self.device, self.seed = cfg, device, seed
        self.tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        self.tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        self.ep = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.ep_rank = dist.get_rank(ep_group) if ep_group is not None else 0
        self.weights = None
        if init_file:
            shapes = {name: tuple(p.shape) for name, p in Llama(cfg, device="meta").named_parameters()}
            self.weights = InitialWeights(init_file, shapes)
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, layer: nn.Module, index: int) -> None:
        materialize(layer, self.value, self.device, prefix=f"layers.{index}")
        if isinstance(layer, Block):
            if self.rope is None:
                self.rope = rope_tables(self.cfg, self.device)
            layer.cos, layer.sin = self.rope

    def value(self, name: str, p: nn.Parameter) -> torch.Tensor:
        """This rank's part of parameter `name` (`p` has the part's shape)."""
        dim, parts, part = None, 1, 0
        if self.tp > 1 and tp_split_dim(name) is not None:
            dim, parts, part = tp_split_dim(name), self.tp, self.tp_rank
        elif self.ep > 1 and is_expert_weight(name):
            dim, parts, part = 0, self.ep, self.ep_rank
        if self.weights:
            return self.weights.read(name, dim, parts, part)
        if dim is None:
            return initial_value(self.cfg, name, p.shape, self.seed)
        shape = list(p.shape)
        shape[dim] *= parts
        return initial_value(self.cfg, name, shape, self.seed).chunk(parts, dim)[part].clone()  # not a view of the full value
