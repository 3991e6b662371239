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

from bigtrain import compat

_torch_load = torch.load  # the real one, also while `weights_only_loads` has replaced it


def load(path: str | Path, map_location: Any = None, **kwargs: Any) -> Any:
    """`torch.load(path, weights_only=True)`; a refused file raises a one-line `UnpicklingError`."""
    kwargs["weights_only"] = True
    try:
        return _torch_load(path, map_location=map_location, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects that are not plain tensors"
        raise pickle.UnpicklingError(f"{path} holds {what}; refusing to unpickle it (it could run code)") from None


def check_files(directory: Path, allowed: list[type]) -> None:
    """Refuse `directory` if any `.pt` file in it pickles a class outside `allowed`.

    Only each file's pickle record is read, not its tensors, so every rank can check every file
    cheaply; all ranks then refuse together instead of one failing inside a collective load.
    """
    names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
    for file in sorted(Path(directory).rglob("*.pt")):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
        except RuntimeError as e:  # not a zip archive: truncated or not written by torch.save
            raise pickle.UnpicklingError(f"{file} is not a readable torch file ({str(e).splitlines()[0]})") from None
        unsafe = sorted(set(found) - names)
        if unsafe:
            raise pickle.UnpicklingError(f"{file} holds a pickled {unsafe[0]}; refusing to unpickle it (it could run code)")


def deepspeed_globals() -> list[type]:
    """The plain-data classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, …)."""
    return compat.deepspeed_checkpoint_classes()


@contextlib.contextmanager
def weights_only_loads(allowed: list[type]) -> Iterator[None]:
    """Within the block, every `torch.load` (by any library) is `load` above, allowing `allowed`."""
    def weights_only(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs.pop("weights_only", None)
        return load(f, map_location=map_location, **kwargs)

    with compat.replaced_torch_load(weights_only), torch.serialization.safe_globals(allowed):
        yield
