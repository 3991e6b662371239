"""This rank's share of the model as the DeepSpeed engine takes it: its pipeline stage's layers,
built on the meta device one at a time (`stage_layers`), then cut, materialised and finished by
`parallelize` as each arrives (`parallelize_stage`), so a rank never holds more than its share
plus one full layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from deepspeed.pipe import LayerSpec
from torch import nn

from bigtrain.config import Config, ModelConfig
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.deepspeed.grid import Topology
from bigtrain.engine.device import compile_enabled, rank_device, resolve_precision
from bigtrain.model.llama import Block, Llama, layer_args, layer_type, meta_layer
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
        specs = [LayerSpec(layer_type(cfg, i), *layer_args(cfg, i)) for i in range(cfg.n_layers + 2)]
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


def stage_layers(cfg: ModelConfig, topology: Topology) -> Iterator[nn.Module]:
    """This rank's layers on the meta device, each built when the previous one has been taken."""
    if topology.tp > 1:
        check_tensor_parallel(cfg, topology.tp)
    start, stop = stage_of(cfg, topology)
    return (meta_layer(cfg, i) for i in range(start, stop))


def parallelize_stage(layers: Iterable[nn.Module], cfg: Config, topology: Topology, timer: PhaseTimer,
                      materialize: Callable[[nn.Module, int], None] | None = None,
                      finish: Callable[[nn.Module], None] | None = None) -> Stage:
    """`parallelize` this rank's layers, each as it arrives, over the topology's groups (`timer`
    clocks sequence parallelism's all-to-alls; `materialize` and `finish` as `parallelize`
    takes them): the stage the DeepSpeed engine wraps."""
    device = rank_device(cfg.train.device)
    start, _ = stage_of(cfg.model, topology)
    owned = parallelize(layers, cfg, fp8=resolve_precision(cfg.train.precision, device, "deepspeed") == "fp8",
                        compile=compile_enabled(cfg.train.compile, device),
                        tp_group=topology.tp_group if topology.tp > 1 else None,
                        sp_group=topology.sp_group if topology.sp > 1 else None, ep_group=topology.ep_group,
                        timer=timer, first=start,
                        materialize=materialize, finish=finish)
    if topology.pp > 1 and cfg.data.document_masking:
        carry_documents(owned, start, cfg.model.n_layers + 1)
    return Stage.of(owned, cfg.model, topology)


def carry_documents(layers: list[nn.Module], first: int, head: int) -> None:
    """Under document masking pipeline stages pass (activations, documents[, positions]): each of
    this stage's layers (from layer `first` of the list) takes that tuple, applies itself (a block
    with the documents) and passes the documents on; the head (layer `head`) returns its output
    alone, the loss function's input."""
    for index, layer in enumerate(layers, first):
        layer.forward = _carrying(layer.forward, isinstance(layer, Block), index == head)


def _carrying(forward: Callable, block: bool, last: bool) -> Callable:
    def carried(inputs: tuple):
        x, *documents = inputs
        y = forward(x, *documents) if block else forward(x)
        return y if last else (y, *documents)

    return carried


def owned_layers(model: Llama, topology: Topology) -> list[nn.Module]:
    """This rank's layers of an already built full model (for a caller that holds one)."""
    start, stop = stage_of(model.cfg, topology)
    return list(model.layers[start:stop])
