"""Where bigtrain changes what DeepSpeed does, one named function per change; each says what
DeepSpeed does and why bigtrain does otherwise. Private internals are reached through `compat`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.utils import clip_grad_norm_

from bigtrain import compat
from bigtrain.distributed.timing import PhaseTimer

# the phase each instruction of DeepSpeed's 1F1B schedule counts as (waiting included)
PIPE_PHASES = {
    schedule.LoadMicroBatch: "load", schedule.ForwardPass: "forward", schedule.BackwardPass: "backward",
    schedule.SendActivation: "pipe_comm", schedule.RecvActivation: "pipe_comm", schedule.SendGrad: "pipe_comm",
    schedule.RecvGrad: "pipe_comm", schedule.ReduceGrads: "optimizer", schedule.ReduceTiedGrads: "optimizer",
    schedule.OptimizerStep: "optimizer",
}


def gate_optimizer_step(optimizer: torch.optim.Optimizer, skip: Callable[[], torch.Tensor]) -> None:
    """Make `optimizer.step` leave weights and optimizer state alone when `skip()` is true.

    DeepSpeed calls the client optimizer's `step` (on its fp32 partitions under ZeRO) and itself
    skips only an fp16 overflow or, under ZeRO, a non-finite norm; bigtrain's update gate also
    skips loss spikes and every engine's non-finite steps. `skip()` returns a 0-dim bool tensor
    (it may be asked once per ZeRO-3 sub-group). Fused AdamW gets it as `found_inf` and skips on
    the device, without a host sync."""
    step, fused = optimizer.step, bool(optimizer.defaults.get("fused"))

    def gated_step(*args, **kwargs) -> None:
        decision = skip()
        if fused:
            optimizer.found_inf = decision.float()
            step(*args, **kwargs)
        elif not decision:
            step(*args, **kwargs)

    optimizer.step = gated_step


def record_grad_norm(engine: Any, record: Callable[[torch.Tensor], None]) -> None:
    """Hand `record` the gradient norm the engine measures when it clips without ZeRO in fp32.

    There DeepSpeed clips with `clip_grad_norm_` and drops the norm (`get_global_grad_norm` is
    None); bigtrain logs it and its update gate decides on it."""
    def clip_and_record() -> None:
        record(clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(), mpu=engine.mpu))

    compat.replace_fp32_clipping(engine, clip_and_record)


def send_whole_activations(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config with `pipe_partitioned` and `grad_partitioned` off.

    DeepSpeed's pipeline sends 1/tp of each activation from every tensor-parallel rank and
    rebuilds a tensor the tp ranks share; under tensor sequence parallelism the stages pass
    sequence shards that differ on each tp rank, so each must be sent whole."""
    pipeline = {**ds_config.get("pipeline", {}), "pipe_partitioned": False, "grad_partitioned": False}
    return {**ds_config, "pipeline": pipeline}


def pipeline_module(layers: list, loss_fn: Callable, topology: Any, grid: Any, bounds: tuple[int, int]) -> PipelineModule:
    """DeepSpeed's `PipelineModule` over `layers` (built in `bounds`, `LayerSpec`s elsewhere) that
    uses `grid` as its mpu.

    DeepSpeed builds a plain grid of its own, without the sequence-parallel groups; and it cuts the
    list itself, so a cut other than the one this rank was built for is refused here."""
    module = PipelineModule(layers=layers, loss_fn=loss_fn, topology=topology, partition_method="type:Block")
    compat.use_pipeline_grid(module, grid)
    if compat.pipeline_stage_layers(module) != bounds:
        raise RuntimeError(f"DeepSpeed gave this stage layers {compat.pipeline_stage_layers(module)}, "
                           f"not the {bounds[0]}..{bounds[1]} built for it")
    return module


def time_pipeline_instructions(engine: deepspeed.PipelineEngine, timer: PhaseTimer) -> None:
    """Time every instruction the pipeline engine executes under its phase (`PIPE_PHASES`).

    DeepSpeed's own `wall_clock_breakdown` timers trip over each other in the pipeline engine's
    backward."""
    def timed(run, phase):
        def wrapper(self, *args, **kwargs):
            with timer.phase(phase):
                return run(self, *args, **kwargs)
        return wrapper

    compat.wrap_pipeline_instructions(engine, lambda kind, run: timed(run, PIPE_PHASES[kind]))


def mark_for_grad_norm(stage: torch.nn.Module, tp_rank: int) -> None:
    """Make DeepSpeed's global gradient norm count every pipeline stage's parameters.

    DeepSpeed counts a parameter when it is model-parallel or this rank is rank 0 of the
    (pipe × tensor) group, which would drop all replicated parameters of later stages. Marking
    them on tensor-parallel rank 0 of each stage counts each exactly once.
    """
    if tp_rank == 0:
        for p in stage.parameters():
            if not getattr(p, "tensor_model_parallel", False):
                compat.count_once_in_grad_norm(p)
