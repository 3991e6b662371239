"""Reading checkpoint files without running pickled code.

`torch.load(weights_only=True)` rebuilds only tensors, containers and allow-listed classes, so a
file crafted to run code on unpickling is refused. DeepSpeed calls `torch.load(weights_only=False)`
itself (its checkpoint engine, `zero_to_fp32`); `weights_only_loads` makes every `torch.load` inside
its block weights-only and allows the few plain-data DeepSpeed classes its checkpoints hold.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_torch_load = torch.load


def load(path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`; a refused file raises a one-line `UnpicklingError`."""
    kwargs["weights_only"] = True
    try:
        return _torch_load(path, map_location=map_location, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects that are not plain tensors"
        raise pickle.UnpicklingError(f"{path} holds {what}; refusing to unpickle it (it could run code)") from None


def deepspeed_globals() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, …)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(allowed: list[type]) -> Iterator[None]:
    """Within the block, every `torch.load` (by any library) is `load` above, allowing `allowed`."""
    def patched(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return load(f, map_location=map_location, **kwargs)

    torch.load = patched
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        torch.load = _torch_load
