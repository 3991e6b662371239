"""Expert parallelism under DeepSpeed: its MoE machinery reduces and partitions the expert weights
over their own group (the ranks that hold the same experts), the rest over the data-parallel group.

DeepSpeed recognises an MoE model by `deepspeed.moe.layer.MoE` instances and an expert weight by
`allreduce = False` plus the name of its group; bigtrain's MoE blocks keep their own routing and
dispatch (fine-grained top-k, dropless) and only take those marks (`declare_experts`). A checkpoint
of an expert-parallel run is the single-process layout (`full_state`): every rank gathers its
experts' full fp32 weights and AdamW moments, rank 0 writes them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param
from deepspeed.runtime.utils import clip_grad_norm_
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from torch import nn

from bigtrain import compat
from bigtrain.checkpoint import format as fmt
from bigtrain.checkpoint.writes import Direct
from bigtrain.config import Config
from bigtrain.engine.deepspeed.grid import Topology
from bigtrain.engine.optimizer import build_adamw
from bigtrain.model import Llama
from bigtrain.model.moe import moe_layers
from bigtrain.parallel.layout import is_expert_weight, tp_split_dim


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"  # DeepSpeed's name for the groups of degree ep


class _MarkedMoE(DeepSpeedMoE):
    """What DeepSpeed asks of an MoE layer it finds (its own groups come from `declare_experts`)."""

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        pass


def declare_experts(module: nn.Module, topology: Topology) -> None:
    """Mark `module`'s MoE blocks and expert weights for DeepSpeed and register the grid's expert
    groups under DeepSpeed's name for them (before `deepspeed.initialize`)."""
    name = expert_group_name(topology.ep)
    compat.register_expert_groups(name, topology.grid.ep_group, topology.grid.expert_data_group)
    for layer in moe_layers(module):
        layer.__class__ = type("DeepSpeedMarkedMoE", (type(layer), _MarkedMoE), {})
        layer.num_experts, layer.expert_group_name = layer.experts_total, name
    for param_name, p in module.named_parameters():
        if is_expert_weight(param_name):
            p.allreduce, p.group_name = False, name


def expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """`param_groups` with the expert weights of each moved into a group of its own, marked as
    DeepSpeed's ZeRO expects (`moe`, and the expert group's `name`)."""
    out = []
    for group in param_groups:
        experts = [p for p in group["params"] if is_moe_param(p)]
        out.append({**group, "params": [p for p in group["params"] if not is_moe_param(p)]})
        if experts:
            out.append({**group, "params": experts, "moe": True, "name": experts[0].group_name})
    return out


def clip_with_experts(engine: object, topology: Topology, record: Callable[[torch.Tensor], None]) -> None:
    """Where the engine clips without ZeRO in fp32: measure the norm over all experts (the other ep
    ranks' and pipeline stages' too, which DeepSpeed's `clip_grad_norm_` leaves out), clip every
    gradient by it and hand it to `record`."""
    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        dense = [p for p in params if not is_moe_param(p)]
        experts = [p for p in params if is_moe_param(p)]
        squares = torch.stack([p.grad.detach().float().square().sum() for p in experts]).sum()
        if topology.grid.get_slice_parallel_rank() != 0:  # experts are whole on every tp rank: count them once
            squares = torch.zeros_like(squares)
        dist.all_reduce(squares, group=topology.ep_group)  # every expert of the block
        dist.all_reduce(squares, group=engine.mpu.get_model_parallel_group())  # every stage (and tp rank)
        norm = (clip_grad_norm_(dense, float("inf"), mpu=engine.mpu) ** 2 + squares).sqrt()
        max_norm = engine.gradient_clipping()
        if max_norm > 0 and norm > max_norm:
            torch._foreach_mul_([p.grad for p in params], max_norm / (norm + 1e-6))
        record(norm)

    compat.replace_fp32_clipping(engine, clip)


def save_full_state(module: nn.Module, wrapper: object, adamw: torch.optim.Optimizer, names: dict[int, str],
                    cfg: Config, topology: Topology, directory: Path, writes: Direct) -> None:
    """Write `model.safetensors` and `optimizer.pt` of the one-process model (rank 0), every rank
    contributing its parameters' full fp32 values and AdamW moments (expert weights gathered
    across the expert-parallel group, tensor-parallel slices across theirs, pipeline stages on
    rank 0); `wrapper` is
    DeepSpeed's optimizer around `adamw`."""
    compat.link_optimizer_state(wrapper)
    weights, moments, step = {}, {}, None
    for p in module.parameters():
        name = names[id(p)]
        master = safe_get_full_fp32_param(p)
        value = (master if master is not None else p.detach()).float()
        state = {key: safe_get_full_optimizer_state(p, key) for key in fmt.MOMENTS}
        if state["exp_avg"] is None and p in adamw.state:  # no DeepSpeed fragment: torch's own state
            state = {key: adamw.state[p][key] for key in fmt.MOMENTS}
        for group, dim in _splits(name, topology):
            value = _gather(value, group, dim)
            state = {key: _gather(t, group, dim) if t is not None else None for key, t in state.items()}
        weights[name] = value.cpu()
        if state["exp_avg"] is not None:
            moments[name] = {key: t.float().cpu() for key, t in state.items()}
    for state in adamw.state.values():
        step = state["step"].cpu()
        break
    # the first replica of every pipeline stage holds its stage whole now: rank 0 gathers them
    shares = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((weights, moments, step) if topology.grid.replica_rank == 0 else None, shares, dst=0)
    if dist.get_rank() == 0:
        for share in filter(None, shares):
            weights.update(share[0])
            moments.update(share[1])
            step = share[2] if step is None else step
        writes.safetensors(weights, directory / fmt.WEIGHTS)
        one_process = build_adamw(Llama(cfg.model, device="meta"), cfg.train)
        if step is None:  # saved before the first update
            moments, step = {}, torch.zeros(())
        writes.torch_save(fmt.adamw_state(one_process, fmt.parameter_names(cfg), moments, step), directory / fmt.OPTIMIZER)


def _splits(name: str, topology: Topology) -> list[tuple[dist.ProcessGroup, int]]:
    """The groups parameter `name` is split over, and along which dimension."""
    splits = [(topology.ep_group, 0)] if is_expert_weight(name) else []
    if topology.tp > 1 and tp_split_dim(name) is not None:
        splits.append((topology.tp_group, tp_split_dim(name)))
    return splits


def _gather(part: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, part.contiguous(), group=group)
    return torch.cat(parts, dim=dim)

