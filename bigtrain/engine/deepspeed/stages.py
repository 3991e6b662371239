"""Build only this rank's share of the model: its pipeline stage's layers, one at a time.

The weights are bit for bit `Llama(cfg)`'s. `Llama` first constructs every layer (each module's
constructor draws its default init from the global RNG), then draws `init_parameter` over all
parameters in order. This replays that stream one layer at a time: pass 1 constructs and drops
every layer (the constructors' draws); pass 2 constructs each layer again with the RNG state
restored around it, draws its init, loads its `init_from` weights and hands it on only where this
stage owns it. `parallelize` shards each layer as it arrives, so a rank never holds more than its
share plus one full layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
from deepspeed.pipe import LayerSpec
from safetensors import SafetensorError
from torch import nn

from bigtrain.config import Config, ModelConfig
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.deepspeed.grid import Topology
from bigtrain.engine.device import compile_enabled, rank_device, resolve_precision
from bigtrain.errors import BigtrainError
from bigtrain.model.llama import Llama, init_parameter, layer_type, make_layer
from bigtrain.parallel.layout import check_tensor_parallel, stage_bounds
from bigtrain.parallel.parallelize import parallelize


def stage_of(cfg: ModelConfig, topology: Topology) -> tuple[int, int]:
    """Layers [start, stop) of this rank's pipeline stage."""
    bounds = stage_bounds(cfg.n_layers, topology.pp)
    stage = topology.grid.get_stage_id()
    return bounds[stage], bounds[stage + 1]


@dataclass
class Stage:
    """The model's layer list as this rank holds it, the form `PipelineModule` takes: built layers
    in [start, stop), elsewhere `LayerSpec`s never built."""

    layers: list[nn.Module | LayerSpec]
    start: int
    stop: int

    @classmethod
    def of(cls, owned: list[nn.Module], cfg: ModelConfig, topology: Topology) -> Stage:
        """The stage whose built layers are `owned` (this rank's, in order)."""
        start, stop = stage_of(cfg, topology)
        specs = [LayerSpec(layer_type(cfg, i), cfg) for i in range(cfg.n_layers + 2)]
        return cls(specs[:start] + owned + specs[stop:], start, stop)

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


def parallelize_stage(layers: Iterable[nn.Module], cfg: Config, topology: Topology, timer: PhaseTimer) -> Stage:
    """`parallelize` this rank's layers, each as it arrives, over the topology's groups (`timer`
    clocks sequence parallelism's all-to-alls): the stage the DeepSpeed engine wraps."""
    device = rank_device(cfg.train.device)
    start, _ = stage_of(cfg.model, topology)
    owned = parallelize(layers, cfg, fp8=resolve_precision(cfg.train.precision, device, "deepspeed") == "fp8",
                        compile=compile_enabled(cfg.train.compile, device),
                        tp_group=topology.tp_group if topology.tp > 1 else None,
                        sp_group=topology.sp_group if topology.sp > 1 else None, timer=timer, first=start)
    return Stage.of(owned, cfg.model, topology)


def owned_layers(model: Llama, topology: Topology) -> list[nn.Module]:
    """This rank's layers of an already built full model (for a caller that holds one)."""
    start, stop = stage_of(model.cfg, topology)
    return list(model.layers[start:stop])


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


def build_layers(cfg: ModelConfig, topology: Topology, init_file: Path | None = None) -> Iterator[nn.Module]:
    """This rank's layers, full and initialised (or loaded from `init_file`, a checked
    `model.safetensors`) exactly as `Llama(cfg)` would leave them, each built only when the
    previous one has been taken. A tied head comes with its own weight: `parallelize` ties it."""
    if topology.tp > 1:
        check_tensor_parallel(cfg, topology.tp)
    count = cfg.n_layers + 2
    start, stop = stage_of(cfg, topology)
    for i in range(count):  # pass 1: the constructors' draws, all made before any initialisation
        make_layer(cfg, i)
    weights = _InitialWeights(init_file) if init_file else None
    for i in range(count):  # pass 2: each layer's init draws, in `named_parameters()` order
        if start <= i < stop:
            yield _build_layer(cfg, i, weights)
        else:
            _build_layer(cfg, i, weights)  # drawn (and loaded: checked), then dropped at once
    if weights:
        weights.check_all_used()
