"""A DeepSpeed engine of any layout resumed from the single-process layout: full fp32 weights and
per-parameter AdamW moments (`model.safetensors` + `optimizer.pt`, as the local engine and
`bigtrain convert reshard` write them).

Each rank cuts from every full tensor the tensor-parallel slice its parameter holds (the slice
`apply_tensor_parallel` took), then DeepSpeed's own tensor-fragment API puts the fp32 weight and
the moments into whichever ZeRO or mixed-precision partition owns them; in plain fp32 without ZeRO
the torch AdamW state is the parameter's own and is written directly.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import safetensors
import torch
import torch.distributed as dist
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from bigtrain import compat
from bigtrain.checkpoint import format as fmt
from bigtrain.config import Config
from bigtrain.engine.deepspeed.grid import Topology
from bigtrain.errors import BigtrainError
from bigtrain.parallel.layout import ep_slice, tp_slice


def load_full_state(engine: deepspeed.DeepSpeedEngine, adamw: torch.optim.Optimizer, names: dict[int, str],
                    cfg: Config, topology: Topology, directory: Path) -> None:
    """Set weights, AdamW moments and step of `engine` (freshly built, not yet stepped) from `directory`.

    `adamw` is the torch AdamW handed to DeepSpeed, `names` maps `id(param)` to the parameter's name
    in the one-process model; `topology` says which tensor- and expert-parallel slice is this rank's.
    """
    if "muon" in (cfg.train.optimizer, fmt.read_config(directory).train.optimizer):
        raise BigtrainError(f"{directory} is a single-process checkpoint: placing it into a DeepSpeed layout carries "
                            "AdamW state only, not Muon's (resume Muon runs in the layout that wrote them)")
    # memory-mapped / opened lazily, so each rank reads only the tensors of its own parameters
    moments, step = fmt.adamw_moments(fmt.load_optimizer(directory, map_location="cpu", mmap=True),
                                      fmt.parameter_names(cfg))
    zero3 = engine.zero_optimization_stage() == 3
    own_state = {id(p) for group in adamw.param_groups for p in group["params"]}
    if step is not None:
        _create_adamw_state(engine.optimizer, adamw, step)
    tp_group = topology.tp_group
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    ep, ep_rank = topology.ep, topology.grid.ep_rank
    with safetensors.safe_open(str(directory / fmt.WEIGHTS), framework="pt") as weights:
        for param in engine.module.parameters():
            name = names[id(param)]
            value = _part(param, name, weights.get_tensor(name).float(), tp, tp_rank, ep, ep_rank)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
                param.data.copy_(value)  # the working copy; under ZeRO-3 re-partitioned on exit
            safe_set_full_fp32_param(param, value)  # the fp32 master copy, where there is one
            if step is None:  # saved before the first update: AdamW starts afresh, as it would have
                continue
            for key in fmt.MOMENTS:
                moment = _part(param, name, moments[name][key], tp, tp_rank, ep, ep_rank) if name in moments else torch.zeros_like(value)
                if compat.has_optimizer_fragment(param):
                    safe_set_full_optimizer_state(param, moment, key)
                elif id(param) in own_state:
                    adamw.state[param][key].copy_(moment)
                else:
                    raise BigtrainError(f"cannot place the AdamW state of {name} under this DeepSpeed optimizer "
                                        "(fp16 without ZeRO); resume with parallel.zero_stage >= 1")


def _part(param: torch.Tensor, name: str, full: torch.Tensor, tp: int, tp_rank: int, ep: int, ep_rank: int
          ) -> torch.Tensor:
    """This rank's part of `full`, cut as tensor and expert parallelism cut the parameter's weight."""
    full = ep_slice(tp_slice(full, name, tp, tp_rank), name, ep, ep_rank)
    shape = compat.full_shape(param)
    if full.shape != shape:
        raise BigtrainError(f"checkpoint tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                            f"{tuple(shape)}")
    return full.to(param.device)  # fp32: the master copy and the moments stay exact


def _create_adamw_state(wrapper: object, adamw: torch.optim.Optimizer, step: torch.Tensor) -> None:
    """Give every tensor AdamW updates (the flat fp32 partitions under ZeRO) its state now, with zero
    moments and the saved step, instead of at its first update; then let DeepSpeed link each
    parameter's fragment of it (what its first step would do)."""
    tensors = compat.optimizer_state_tensors(wrapper) or [t for group in adamw.param_groups for t in group["params"]]
    on_device = adamw.defaults.get("fused") or adamw.defaults.get("capturable")
    for t in tensors:
        adamw.state[t] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=t.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(t, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(t, memory_format=torch.preserve_format),
        }
    compat.link_optimizer_state(wrapper)
