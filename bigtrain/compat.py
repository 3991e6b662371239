"""Every use of a library's private internals, in one place.

DeepSpeed, mosaicml-streaming and lm-eval are pinned to the versions these were checked against
(pyproject.toml); tests/unit/test_compat.py fails, naming the internal, when an upgrade removes one.
Other modules reach these libraries' private names only through the functions here; the one
exception is torch's underscore-named attention ops that selective activation checkpointing saves
(`bigtrain/parallel/activation_checkpointing.py`), which are operator names, not internals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

# --- DeepSpeed: the pipeline engine -------------------------------------------------------------


def wrap_pipeline_instructions(engine: Any, wrap: Callable[[type, Callable], Callable]) -> None:
    """Replace each 1F1B instruction's handler `run` of the pipeline `engine` by `wrap(kind, run)`."""
    engine._INSTRUCTION_MAP = {kind: wrap(kind, run) for kind, run in engine._INSTRUCTION_MAP.items()}


def partition_layers(weights: list[int], parts: int) -> list[int]:
    """DeepSpeed's balanced cut of a layer list (public, but DeepSpeed's: kept here so that the
    layout math needs no DeepSpeed import of its own); `PipelineModule` cuts with the same function."""
    from deepspeed.runtime.utils import partition_balanced

    return partition_balanced(weights=weights, num_parts=parts)


def pipeline_stage_layers(module: Any) -> tuple[int, int]:
    """Layers [start, stop) a `PipelineModule` assigned to this rank's stage."""
    return module._local_start, module._local_stop


def use_pipeline_grid(module: Any, grid: Any) -> None:
    """Make a `PipelineModule` hand `grid` (ours, over the same topology) to DeepSpeed as its mpu
    instead of the plain grid it built, which lacks the sequence-parallel groups."""
    module._grid = grid


def expect_pipeline_input(engine: Any, like: torch.Tensor) -> bool:
    """Make a pipeline stage receive its input activations into a buffer shaped like `like`
    without asking the previous stage for their shape first; False where activations travel
    partitioned (tp > 1 without sequence parallelism), whose buffers DeepSpeed lays out itself."""
    if engine.is_pipe_partitioned:
        return False
    engine.pipe_recv_buf = like
    return True


# --- DeepSpeed: gradient norm, clipping, loss scale ----------------------------------------------


def optimizer_grad_norm(wrapper: Any) -> torch.Tensor | float | None:
    """The global gradient norm a ZeRO / bf16 / fp16 optimizer wrapper measured before stepping."""
    return getattr(wrapper, "_global_grad_norm", None)


def replace_fp32_clipping(engine: Any, clip: Callable[[], None]) -> None:
    """Run `clip` where the engine (no ZeRO, fp32) clips its gradients before the optimizer step."""
    engine.clip_fp32_gradients = clip


def fp16_loss_scale(wrapper: Any) -> float | None:
    """The current dynamic fp16 loss scale of DeepSpeed's fp16 optimizer wrappers."""
    scale = getattr(getattr(wrapper, "loss_scale_config", wrapper), "cur_scale", None)
    return None if scale is None else float(scale)


def count_once_in_grad_norm(param: torch.nn.Parameter) -> None:
    """Make DeepSpeed's global gradient norm count a replicated `param` on this rank (DeepSpeed
    counts parameters marked model-parallel, else only those of rank 0 of the model-parallel group)."""
    param.model_parallel = True


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int) -> None:
    """Megatron's marks on a tensor-parallel shard: DeepSpeed's gradient norm then counts it on
    every tensor-parallel rank; `partition_dim`/`partition_stride` describe the split."""
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


# --- DeepSpeed: optimizer state placement --------------------------------------------------------


def has_optimizer_fragment(param: torch.nn.Parameter) -> bool:
    """True when ZeRO (`ds_id`) or a mixed-precision optimizer (`_hp_mapping`) owns `param`'s
    fp32 state, so the tensor-fragment API (`safe_set_full_optimizer_state`) places it."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_shape(param: torch.nn.Parameter) -> torch.Size:
    """`param`'s shape before ZeRO-3 partitioned it."""
    return getattr(param, "ds_shape", param.shape)


def optimizer_state_tensors(wrapper: Any) -> list[torch.Tensor] | None:
    """The flat fp32 partitions ZeRO-3 hands its optimizer at each step (None for other wrappers)."""
    return getattr(wrapper, "fp32_partitioned_groups_flat", None)


def zero_flat_layout(wrapper: Any, index: int) -> tuple[list[torch.nn.Parameter], list[int], int, Any] | None:
    """How ZeRO-1/2 flattened group `index`: its parameters in flat order, each one's offset in
    the group's flat buffer (padding included), the size of one rank's partition and the process
    group it is partitioned over; None when `wrapper` is not ZeRO-1/2's optimizer."""
    offsets = getattr(wrapper, "round_robin_bit16_offsets", None)
    if offsets is None:
        return None
    return (wrapper.round_robin_bit16_groups[index], list(offsets[index]), int(wrapper.partition_size[index]),
            wrapper.real_dp_process_group[index])


def link_optimizer_state(wrapper: Any) -> None:
    """Let ZeRO-1/2 or the bf16 optimizer link each parameter's fragment of its optimizer state
    (freshly created, or all of it: ZeRO-1/2 links after its first group's first step, so the
    fragments of later groups stay empty)."""
    link = getattr(wrapper, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        wrapper._hp_optimizer_states_linked = False
        link()


def gradient_buffers(wrapper: Any) -> list[torch.Tensor]:
    """The gradient storage a DeepSpeed optimizer wrapper keeps besides `param.grad`: ZeRO-3's
    flat gradient partitions, ZeRO-1/2's averaged partitions, the bf16 optimizer's fp32 buffers."""
    held = [getattr(wrapper, "grad_partitions_flat_buffer", None)]
    held += list(getattr(wrapper, "averaged_gradients", {}).values())
    held += list(getattr(wrapper, "fp32_groups_gradients_flat", []))
    return [t for group in held for t in (group if isinstance(group, list) else [group]) if torch.is_tensor(t)]


def bucket_buffers(wrapper: Any) -> list[torch.Tensor]:
    """The gradient reduce buckets a ZeRO optimizer wrapper holds, per communication dtype (a
    tensor under ZeRO-3, a list of them, double-buffered, under ZeRO-1/2)."""
    held = [getattr(bucket, "buffer", None) for bucket in getattr(wrapper, "ipg_buckets", {}).values()]
    return [t for buffer in held for t in (buffer if isinstance(buffer, list) else [buffer]) if torch.is_tensor(t)]


def master_partitions(wrapper: Any) -> list[torch.Tensor]:
    """The fp32 master weights a DeepSpeed optimizer wrapper hands its inner optimizer (ZeRO-1/2,
    ZeRO-3, the bf16 optimizer): one flat tensor per parameter group."""
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
        if getattr(wrapper, name, None):
            return list(getattr(wrapper, name))
    return []


def gathered_now(param: torch.nn.Parameter) -> bool:
    """Whether a ZeRO-3 parameter is gathered in full at this moment (its `data` is the whole tensor)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE


# --- DeepSpeed: ZeRO checkpoints (zero_to_fp32) -----------------------------------------------


def read_zero_checkpoint(ds_dir: str) -> tuple[int, int, list, list, Any, list[str]]:
    """(zero stage, world size, fp32 flat groups, paddings, model states, optimizer files) of the
    ZeRO checkpoint in `ds_dir`, read by DeepSpeed's `zero_to_fp32`."""
    from deepspeed.utils import zero_to_fp32 as z

    model_states = z.parse_model_states(z.get_model_state_files(ds_dir))
    optim_files = z.get_optim_files(ds_dir)
    zero_stage, world, fp32_groups, paddings = z.parse_optim_states(optim_files, ds_dir)
    return zero_stage, world, fp32_groups, paddings, model_states, optim_files


def merge_zero_partitions(zero_stage: int, world: int, flat_groups: list, model_states: Any,
                          paddings: list) -> dict[str, torch.Tensor]:
    """Full tensors by parameter name from every rank's flat partitions (weights or a moment)."""
    from deepspeed.utils import zero_to_fp32 as z

    if zero_stage <= 2:
        merged = z._get_fp32_state_dict_from_zero2_checkpoint(world, flat_groups, model_states, False, paddings)
    else:
        merged = z._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states, False)
    return z.to_torch_tensor(merged)


def deepspeed_checkpoint_classes() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, …)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# --- mosaicml-streaming ----------------------------------------------------------------------------


def partition_streaming_by(dataset: Any, dp_rank: int, dp_size: int) -> None:
    """Make a `StreamingDataset` partition its samples by data-parallel rank instead of by process,
    so tensor/pipeline peers read the same samples."""
    from streaming.base.world import World

    dataset._parallel_rank_world = World(num_nodes=dp_size, ranks_per_node=1, workers_per_rank=1, worker=dp_rank)


# --- lm-evaluation-harness ------------------------------------------------------------------------


def read_task_yaml(path: Any) -> dict[str, Any]:
    """A task YAML as the harness reads it (`include:` merged, `!function` imported), as a dict
    that bigtrain can adjust before handing it to `TaskManager.load`."""
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=True, recursive=True)


# --- torch ----------------------------------------------------------------------------------------


def set_default_group_timeout(timeout: timedelta) -> None:
    """Make every process group created from now on (DeepSpeed's data/tensor/pipeline groups
    included, which it creates without a timeout) time out after `timeout`."""
    from torch.distributed import distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def all_gather_single(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    """`torch.distributed.all_gather_single` (torch ≥ 2.12), or its older name on torch 2.11."""
    import torch.distributed as dist

    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group)


def reduce_scatter_single(out: torch.Tensor, x: torch.Tensor, group: Any) -> None:
    """`torch.distributed.reduce_scatter_single` (torch ≥ 2.12), or its older name on torch 2.11."""
    import torch.distributed as dist

    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """The default process group as rank `rank` of `world_size` on torch's fake backend: every
    collective returns at once and moves no data, so one process can stand in for a rank of a
    large world (Megatron-LM's `--fake-process-group`, torchtitan's `COMM_MODE=fake_backend`)."""
    import torch.distributed as dist

    # importing it registers the "fake" backend
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


@contextlib.contextmanager
def replaced_torch_load(load: Callable[..., Any]) -> Iterator[None]:
    """Within the block, every `torch.load` (by any library: DeepSpeed's checkpoint engine and
    `zero_to_fp32` call it themselves) is `load`."""
    original = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def checkpoint_files_through(engine: Any, writes: Any) -> Iterator[None]:
    """Within the block, every file DeepSpeed's `save_checkpoint` writes (model, optimizer, layer
    and expert states) goes through `writes.torch_save`: its checkpoint engine's `save` is replaced.
    `writes` that copy the tensors themselves (`staged_copies`) spare DeepSpeed its own clone."""
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.save = lambda state_dict, path: writes.torch_save(state_dict, Path(path))
    if getattr(writes, "staged_copies", False):
        checkpoint_engine.preserves_storage_sharing = lambda: False
    try:
        yield
    finally:
        for name in ("save", "preserves_storage_sharing"):
            checkpoint_engine.__dict__.pop(name, None)


def shared_tensor_names(state_dict: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The names `safetensors.torch.save_model` keeps for tensors that share storage (tied
    weights), each with the names it drops (and records in the file's metadata)."""
    from safetensors.torch import _remove_duplicate_names

    return _remove_duplicate_names(state_dict)


def register_expert_groups(name: str, ep_group: Any, expert_data_group: Any) -> None:
    """Make `ep_group` and `expert_data_group` DeepSpeed's expert-parallel and expert-data-parallel
    groups called `name` (its MoE reduction and ZeRO partitioning look them up by that name)."""
    import torch.distributed as dist
    from deepspeed.utils import groups

    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = expert_data_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(ep_group)
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(expert_data_group)


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (e.g. activation checkpointing's recompute)."""
    return torch._C._current_graph_task_id() != -1
