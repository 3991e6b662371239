"""Build only this rank's share of the model: its pipeline stage's layers, tensor-sharded.

The weights are bit for bit `Llama(cfg)`'s, sliced. `Llama` first constructs every layer (each
module's constructor draws its default init from the global RNG), then draws `init_parameter`
over all parameters in order. This replays that stream one layer at a time: pass 1 constructs and
drops every layer (the constructors' draws); pass 2 constructs each layer again with the RNG
state restored around it, draws its init, loads its `init_from` weights, shards it and keeps it
only where this stage owns it. A rank so never holds more than its share plus one full layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from deepspeed.pipe import LayerSpec
from safetensors import SafetensorError
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.engine.deepspeed.grid import Topology
from bigtrain.errors import BigtrainError
from bigtrain.model.llama import Llama, init_parameter, make_layer
from bigtrain.parallel.layout import check_tensor_parallel, stage_bounds
from bigtrain.parallel.tensor_parallel import apply_tensor_parallel, shard_layer


def stage_of(cfg: ModelConfig, topology: Topology) -> tuple[int, int]:
    """Layers [start, stop) of this rank's pipeline stage."""
    bounds = stage_bounds(cfg.n_layers, topology.pp)
    stage = topology.grid.get_stage_id()
    return bounds[stage], bounds[stage + 1]


@dataclass
class Stage:
    """The model's layer list as this rank holds it, the form `PipelineModule` takes: built layers
    in [start, stop), elsewhere `LayerSpec`s never built (or, from `model_stage`, unused layers)."""

    layers: list[nn.Module | LayerSpec]
    start: int
    stop: int

    @property
    def owned(self) -> list[nn.Module]:
        return self.layers[self.start:self.stop]

    def param_names(self) -> dict[int, str]:
        """`id(param)` → the parameter's name in the one-process model (a tied weight: its first)."""
        names: dict[int, str] = {}
        for i, layer in enumerate(self.owned, self.start):
            for name, p in layer.named_parameters(prefix=f"layers.{i}"):
                names.setdefault(id(p), name)
        return names


def model_stage(model: Llama, topology: Topology) -> Stage:
    """The stage of an already built full model, sharded in place (for a caller that holds one)."""
    if topology.tp > 1:
        apply_tensor_parallel(model, topology.tp_group, topology.tp_sequence_parallel)
    return Stage(list(model.layers), *stage_of(model.cfg, topology))


class _InitialWeights:
    """Reads `model.safetensors` of an `init_from` checkpoint one tensor at a time."""

    def __init__(self, file: Path):
        self.file = file
        self.seen: set[str] = set()
        self.handle = self._call(safetensors.safe_open, str(file), framework="pt")
        self.keys = set(self.handle.keys())

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, SafetensorError) as e:
            raise BigtrainError(f"cannot load weights from {self.file.parent}: {e}") from None

    def load(self, name: str, p: torch.Tensor) -> None:
        self.seen.add(name)
        if name not in self.keys:
            raise BigtrainError(f"{self.file.parent} does not match the model: missing {name}")
        value = self._call(self.handle.get_tensor, name)
        if value.shape != p.shape:
            raise BigtrainError(f"{self.file.parent} does not match the model: {name} has shape "
                                f"{tuple(value.shape)}, the model {tuple(p.shape)}")
        p.data.copy_(value)

    def check_all_used(self) -> None:
        unexpected = sorted(self.keys - self.seen)
        if unexpected:
            raise BigtrainError(f"{self.file.parent} does not match the model: unexpected {unexpected[:3]}")


def _build_layer(cfg: ModelConfig, i: int, weights: _InitialWeights | None) -> nn.Module:
    """Layer `i`, full, with the init draws `Llama.reset_parameters` makes for it (its
    constructor's own draws undone), then its `init_from` weights if any."""
    rng = torch.get_rng_state()
    layer = make_layer(cfg, i)
    torch.set_rng_state(rng)
    tied_head = cfg.tie_embeddings and i == cfg.n_layers + 1  # its weight is the embedding's
    for name, p in layer.named_parameters():
        if not (tied_head and name == "lm_head.weight"):
            init_parameter(cfg, name, p)
            if weights:
                weights.load(f"layers.{i}.{name}", p)
    return layer


def build_stage(cfg: ModelConfig, topology: Topology, init_file: Path | None = None) -> Stage:
    """This rank's layers, initialised (or loaded from `init_file`, a checked `model.safetensors`)
    exactly as `Llama(cfg)` then `apply_tensor_parallel` would leave them."""
    if topology.tp > 1:
        check_tensor_parallel(cfg, topology.tp)
    count = cfg.n_layers + 2
    start, stop = stage_of(cfg, topology)
    for i in range(count):  # pass 1: the constructors' draws, all made before any initialisation
        make_layer(cfg, i)
    weights = _InitialWeights(init_file) if init_file else None
    layers: list[nn.Module | LayerSpec] = []
    for i in range(count):  # pass 2: each layer's init draws, in `named_parameters()` order
        if not start <= i < stop:  # drawn (and loaded: checked), then dropped at once
            layers.append(LayerSpec(type(_build_layer(cfg, i, weights)), cfg))
            continue
        layer = _build_layer(cfg, i, weights)
        if topology.tp > 1:
            shard_layer(layer, topology.tp_group, topology.tp_sequence_parallel)
        if cfg.tie_embeddings and i == count - 1:  # tied needs pp=1: this rank owns the embedding
            layer.lm_head.weight = layers[0].embed_tokens.weight
        layers.append(layer)
    if weights:
        weights.check_all_used()
    return Stage(layers, start, stop)
