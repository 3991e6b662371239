"""Run under torchrun: build this rank's share as `train` does (meta layers, materialised and
cut by `parallelize`, ZeRO-3 partitioned layer by layer) while counting the tensor bytes alive,
wrap it in the DeepSpeed engine, then write the counts and bitwise comparisons with
`Llama(cfg, seed=run.seed)` (and with `model.init_from` weights) as JSON. For contrast, the
same probe watches the old way: the full model built first, then its share taken.

Bytes alive are counted independently of the builder's own bookkeeping: every tensor the garbage
collector can reach (distinct storages, meta tensors aside), sampled whenever a full parameter
value has just been drawn, a layer just materialised, a layer just partitioned or a full model
just built: the moments the most is alive.
"""

import gc
import json
import os
import sys
from functools import partial
from pathlib import Path

import deepspeed
import safetensors.torch
import torch

from bigtrain.config import load_config
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine import materialize as materialize_module
from bigtrain.engine.deepspeed import engine as engine_module
from bigtrain.engine.deepspeed.config import deepspeed_config
from bigtrain.engine.deepspeed.grid import init_topology
from bigtrain.engine.deepspeed.stages import owned_layers, parallelize_stage, stage_layers
from bigtrain.engine.materialize import Materializer
from bigtrain.engine.update_gate import UpdateGate
from bigtrain.model import Llama, count_params
from bigtrain.model.llama import meta_layer

cfg = load_config(sys.argv[1], sys.argv[3:])
topology = init_topology(cfg)
timer = PhaseTimer(torch.device("cpu"))
zero3 = cfg.parallel.zero_stage == 3
ds_config = deepspeed_config(cfg, topology.dp * topology.sp)
peak = 0


def live_bytes(*extra) -> int:
    tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and not t.is_meta] + list(extra)
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def sampled(fn):
    def wrapper(*args, **kwargs):
        global peak
        out = fn(*args, **kwargs)
        peak = max(peak, live_bytes(*[out] if torch.is_tensor(out) else []))
        return out
    return wrapper


materialize_module.initial_value = sampled(materialize_module.initial_value)
Materializer.__call__ = sampled(Materializer.__call__)
finish = sampled(partial(engine_module.partition_now, ds_config=ds_config, grid=topology.grid)) if zero3 else None


def measured(build):
    """`build()` and the most bytes it held at once beyond those held before."""
    global peak
    gc.collect()
    before = peak = live_bytes()
    out = build()
    return out, max(peak, live_bytes()) - before


def build(init_file=None):
    """This rank's stage as `build_deepspeed_engine` builds it."""
    materialize = Materializer(cfg.model, torch.device("cpu"), cfg.run.seed, init_file,
                               topology.tp_group if topology.tp > 1 else None)
    return parallelize_stage(stage_layers(cfg.model, topology), cfg, topology, timer, materialize, finish)


def full_then_share():
    """The old way: the whole model built, then this rank's layers of it taken and parallelized."""
    return parallelize_stage(owned_layers(sampled(Llama)(cfg.model, seed=cfg.run.seed), topology), cfg, topology,
                             timer, None, finish)


def held(stage) -> list:
    return list({id(p): p for layer in stage.owned for p in layer.parameters()}.values())


def bytes_held(params) -> int:
    """Bytes of the storages of this rank's parameters (under ZeRO-3: of their partitions), so a
    slice that is a view of a full value counts as the full value."""
    return sum({id(p): getattr(p, "ds_tensor", p).untyped_storage().nbytes() for p in params}.values())


def elements_held(params) -> int:
    """Elements of this rank's parameters (under ZeRO-3: of their partitions), where storages are
    DeepSpeed's: once wrapped, ZeRO-3's partitions are views of its flat buffers."""
    return sum({id(p): getattr(p, "ds_tensor", p).numel() for p in params}.values())


def mismatches(params, names: dict[int, str], full: torch.nn.Module) -> list[str]:
    """Names of the parameters that differ from their tensor-parallel slice of `full`."""
    reference, differ = dict(full.named_parameters()), []
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        for p in params:
            expected = reference[names[id(p)]]
            if getattr(p, "tensor_model_parallel", False):
                expected = expected.chunk(topology.tp, dim=p.partition_dim)[torch.distributed.get_rank(topology.tp_group)]
            if not torch.equal(p.detach(), expected):
                differ.append(names[id(p)])
    return differ


rng_before = torch.get_rng_state()
stage, stage_peak = measured(build)
rng_untouched = torch.equal(rng_before, torch.get_rng_state())
reference = Llama(cfg.model, seed=cfg.run.seed)
params = held(stage)
report = {"peak": stage_peak, "share": bytes_held(params), "share_elements": elements_held(params),
          "rng_untouched": rng_untouched, "compared": len(params),
          "mismatches": mismatches(params, stage.param_names(), reference)}
# the engine must take the stage as built (ZeRO-3: as partitioned), its values unchanged
engine = engine_module.DeepSpeedEngine(stage, cfg, topology, UpdateGate(), timer, ds_config)
engine_params = list(engine.model.parameters())
report.update(engine_share_elements=elements_held(engine_params), engine_compared=len(engine_params),
              engine_mismatches=mismatches(engine_params, engine.param_names, reference))
del reference
# `model.init_from`: each parameter's slice read from the file as its layer is materialised
saved = Llama(cfg.model, seed=cfg.run.seed + 1)
init_file = Path(sys.argv[2], f"init{topology.env.rank}.safetensors")
safetensors.torch.save_model(saved, str(init_file))
loaded = build(init_file)
report.update(loaded=len(held(loaded)), init_from_mismatches=mismatches(held(loaded), loaded.param_names(), saved))
del saved, loaded
_, report["full_then_share_peak"] = measured(full_then_share)

layer_bytes = [4 * sum(p.numel() for p in meta_layer(cfg.model, i).parameters()) for i in range(cfg.model.n_layers + 2)]
report.update(largest_layer=max(layer_bytes), full_model=4 * count_params(cfg.model).total,
              rope=2 * 4 * cfg.model.max_seq_len * cfg.model.head_dim)
Path(sys.argv[2], f"rank{topology.env.rank}.json").write_text(json.dumps(report))
torch.distributed.barrier()
os._exit(0)  # skip the interpreter's teardown, as zero_sizes_worker.py does
