"""Run under torchrun: build this rank's share as `train` does (meta layers, materialised and
cut by `parallelize`, ZeRO-3 partitioned layer by layer) while counting the tensor bytes alive,
then write the counts and a bitwise comparison with `Llama(cfg, seed=run.seed)` as JSON.

Bytes alive are counted independently of the builder's own bookkeeping: every tensor the garbage
collector can reach (distinct storages, meta tensors aside), sampled whenever a full parameter
value has just been drawn, a layer just materialised, or a layer just partitioned: the moments
the most is alive.
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
from bigtrain.engine.deepspeed.stages import parallelize_stage, stage_layers
from bigtrain.engine.materialize import Materializer
from bigtrain.model import Llama, count_params
from bigtrain.model.llama import meta_layer

cfg = load_config(sys.argv[1], sys.argv[3:])
topology = init_topology(cfg)
zero3 = cfg.parallel.zero_stage == 3
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
finish = partial(engine_module.partition_now, ds_config=deepspeed_config(cfg, topology.dp * topology.sp),
                 grid=topology.grid) if zero3 else None


def build(init_file=None):
    """This rank's stage and the most bytes building it held beyond those held before."""
    global peak
    before = peak = live_bytes()
    materialize = Materializer(cfg.model, torch.device("cpu"), cfg.run.seed, init_file,
                               topology.tp_group if topology.tp > 1 else None)
    stage = parallelize_stage(stage_layers(cfg.model, topology), cfg, topology, PhaseTimer(torch.device("cpu")),
                              materialize, sampled(finish) if finish else None)
    return stage, max(peak, live_bytes()) - before


def held(stage) -> list:
    return list({id(p): p for layer in stage.owned for p in layer.parameters()}.values())


def mismatches(stage, full: torch.nn.Module) -> list[str]:
    """Names of this rank's parameters that differ from their tensor-parallel slice of `full`."""
    reference, names, differ = dict(full.named_parameters()), stage.param_names(), []
    params = held(stage)
    with deepspeed.zero.GatheredParameters(params, enabled=zero3):
        for p in params:
            expected = reference[names[id(p)]]
            if getattr(p, "tensor_model_parallel", False):
                expected = expected.chunk(topology.tp, dim=p.partition_dim)[torch.distributed.get_rank(topology.tp_group)]
            if not torch.equal(p.detach(), expected):
                differ.append(names[id(p)])
    return differ


stage, stage_peak = build()
share = sum({id(p): getattr(p, "ds_tensor", p).untyped_storage().nbytes() for p in held(stage)}.values())
layer_bytes = [4 * sum(p.numel() for p in meta_layer(cfg.model, i).parameters()) for i in range(cfg.model.n_layers + 2)]
rope = 2 * 4 * cfg.model.max_seq_len * cfg.model.head_dim
report = {"peak": stage_peak, "share": share, "largest_layer": max(layer_bytes), "rope": rope,
          "full_model": 4 * count_params(cfg.model).total, "compared": len(held(stage)),
          "mismatches": mismatches(stage, Llama(cfg.model, seed=cfg.run.seed))}
# `model.init_from`: each parameter's slice read from the file as its layer is materialised
saved = Llama(cfg.model, seed=cfg.run.seed + 1)
init_file = Path(sys.argv[2], f"init{topology.env.rank}.safetensors")
safetensors.torch.save_model(saved, str(init_file))
loaded, _ = build(init_file)
report.update(loaded=len(held(loaded)), init_from_mismatches=mismatches(loaded, saved))
Path(sys.argv[2], f"rank{topology.env.rank}.json").write_text(json.dumps(report))
torch.distributed.barrier()
os._exit(0)  # skip the interpreter's teardown, as zero_sizes_worker.py does
