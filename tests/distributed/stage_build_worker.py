"""Run under torchrun: build this rank's stage while counting the parameter elements alive, then
hand it to DeepSpeed and write the counts and a bitwise comparison with `Llama(cfg)` as JSON.

Live elements are counted independently of the builder's own bookkeeping: every `nn.Parameter`
the garbage collector can reach (distinct storages), sampled whenever a layer has just been
constructed or a tensor-parallel shard just cut: the moments a full layer is alive.
"""

import gc
import json
import os
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from bigtrain.config import load_config
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.deepspeed import stages as stage_build
from bigtrain.engine.deepspeed.engine import DeepSpeedEngine
from bigtrain.engine.deepspeed.grid import init_topology
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.model import Llama, count_params
from bigtrain.model.llama import make_layer
from bigtrain.parallel import tensor_parallel_layers

cfg = load_config(sys.argv[1], sys.argv[3:])
topology = init_topology(cfg)
timer = PhaseTimer(torch.device("cpu"))
peak = 0


def live_parameter_elements() -> int:
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in gc.get_objects() if isinstance(p, nn.Parameter)}
    return sum(storages.values())


def probed(fn):
    def wrapper(*args, **kwargs):
        global peak
        out = fn(*args, **kwargs)
        peak = max(peak, live_parameter_elements())
        return out
    return wrapper


stage_build.make_layer = probed(stage_build.make_layer)
tensor_parallel_layers._shard = probed(tensor_parallel_layers._shard)


def measured_build(build):
    """The build's result and the most parameter elements it held at once (beyond those held before)."""
    global peak
    before = peak = live_parameter_elements()
    torch.manual_seed(cfg.run.seed)
    stage = build()
    return stage, max(peak, live_parameter_elements()) - before


def build_stage(init_file=None):
    """This rank's stage as `build_engine` makes it: built layer by layer, parallelized as each arrives."""
    return stage_build.parallelize_stage(stage_build.build_layers(cfg.model, topology, init_file), cfg, topology, timer)


# the stage builder; then, for contrast, the full model built first and sharded afterwards
stage, stage_peak = measured_build(build_stage)
rng_after_stage = torch.get_rng_state()
share = sum({id(p): p.numel() for layer in stage.owned for p in layer.parameters()}.values())
engine = DeepSpeedEngine(stage, cfg, topology, UpdateGate(None), timer)  # PipelineModule must accept the stage as built
engine_params = list(engine.model.parameters())
del stage
_, full_then_shard_peak = measured_build(  # sampled once the full model exists, before its share is taken
    lambda: stage_build.parallelize_stage(stage_build.owned_layers(probed(Llama)(cfg.model), topology), cfg, topology, timer))

with torch.device("meta"):
    layer_sizes = [sum(p.numel() for p in make_layer(cfg.model, i).parameters()) for i in range(cfg.model.n_layers + 2)]


def mismatches(params, names: dict[int, str], full: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ from their tensor-parallel slice of `full`."""
    reference, differ = dict(full.named_parameters()), []
    for p in params:
        expected = reference[names[id(p)]]
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(topology.tp, dim=p.partition_dim)[torch.distributed.get_rank(topology.tp_group)]
        if not torch.equal(p.detach().cpu(), expected):
            differ.append(names[id(p)])
    return differ


torch.manual_seed(cfg.run.seed)
engine_mismatches = mismatches(engine_params, engine.param_names, Llama(cfg.model))
rng_equal = torch.equal(rng_after_stage, torch.get_rng_state())
# `model.init_from`: each layer's weights read from the file as the layer is built
torch.manual_seed(cfg.run.seed + 1)
saved = Llama(cfg.model)
init_file = Path(sys.argv[2], f"init{topology.env.rank}.safetensors")
safetensors.torch.save_model(saved, str(init_file))
loaded = build_stage(init_file)
loaded_params = list({id(p): p for layer in loaded.owned for p in layer.parameters()}.values())
report = {
    "peak": stage_peak, "full_then_shard_peak": full_then_shard_peak, "share": share,
    "largest_layer": max(layer_sizes), "full_model": count_params(cfg.model).total, "compared": len(engine_params),
    "mismatches": engine_mismatches, "rng_equal": rng_equal, "loaded": len(loaded_params),
    "init_from_mismatches": mismatches(loaded_params, loaded.param_names(), saved),
}
Path(sys.argv[2], f"rank{topology.env.rank}.json").write_text(json.dumps(report))
torch.distributed.barrier()
os._exit(0)  # skip the interpreter's teardown, as zero_sizes_worker.py does
