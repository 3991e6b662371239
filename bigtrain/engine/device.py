"""Which device a process trains on and in which precision: one policy for every engine."""

from __future__ import annotations

import contextlib
import importlib.util

import torch

from bigtrain.errors import BigtrainError


def pick_device(name: str) -> torch.device:
    """`train.device`: auto is the GPU when one is visible, else the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise BigtrainError("train.device=cuda but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def rank_device(name: str) -> torch.device:
    """`train.device` for one of a run's processes: on CUDA, the GPU this rank was given (its
    current device); `cpu` stays the CPU on a host with GPUs."""
    device = pick_device(name)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else device


FP8_CAPABILITY = (8, 9)  # float8 tensor cores: Ada (8.9) and Hopper (9.0) onwards


def resolve_precision(precision: str, device: torch.device, engine: str) -> str:
    """`train.precision` as fp32, bf16, fp16 or fp8 on `device` (auto: bf16 on CUDA, fp32 elsewhere)."""
    if precision == "fp8":
        check_fp8(device, engine)
    if precision in ("bf16", "fp16") and device.type != "cuda":
        raise BigtrainError(f"train.precision={precision} needs a CUDA device (use fp32 or auto on CPU)")
    if precision == "fp16" and engine == "local":
        raise BigtrainError("train.precision=fp16 needs parallel.engine=deepspeed (dynamic loss scaling)")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def check_fp8(device: torch.device, engine: str) -> None:
    """fp8 (torchao float8 training) needs float8 tensor cores, torchao and the local engine."""
    if device.type != "cuda":
        raise BigtrainError(f"train.precision=fp8 needs a CUDA GPU of compute capability >= 8.9 "
                            f"(Ada, Hopper or newer), not {device.type}; use bf16 or fp32")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise BigtrainError(f"train.precision=fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); "
                            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}; use bf16")
    if engine != "local":
        raise BigtrainError("train.precision=fp8 runs on parallel.engine=local only; use bf16 with DeepSpeed")
    if importlib.util.find_spec("torchao") is None:
        raise BigtrainError("train.precision=fp8 needs torchao: pip install 'bigtrain[fp8]'")


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """`train.compile`: auto compiles on CUDA (where it pays at once) and stays eager on CPU (where
    the first step's compilation outweighs the gain of a short run)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def deterministic_enabled(setting: bool | str, device: torch.device) -> bool:
    """`train.deterministic`: auto is on for CPU (bitwise reproducible runs and resumes) and off for
    CUDA, where flash attention's backward is not deterministic anyway."""
    return device.type != "cuda" if setting == "auto" else bool(setting)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The local engine's mixed precision for `precision` as `resolve_precision` gives it: bf16
    autocast (over fp32 weights, or bf16 ones with `train.master_weights`; also around fp8's
    float8 block linears), or plain fp32."""
    if precision in ("bf16", "fp8"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
