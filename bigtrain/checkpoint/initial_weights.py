"""`model.init_from`: the weights of a checkpoint's `model.safetensors`, read one tensor (or one
tensor-parallel slice) at a time, so a rank reads only the bytes of the parameters it holds."""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch
from safetensors import SafetensorError

from bigtrain.errors import BigtrainError


class InitialWeights:
    """An open `model.safetensors` whose header has been checked against `shapes` (the
    one-process model's parameter names and shapes): nothing missing, nothing extra, every
    shape equal, before a single tensor is read."""

    def __init__(self, file: Path, shapes: dict[str, tuple[int, ...]]):
        self.file = file
        self.handle = self._call(safetensors.safe_open, str(file), framework="pt")
        saved = {name: tuple(self._call(self.handle.get_slice, name).get_shape()) for name in self.handle.keys()}
        missing, unexpected = [n for n in shapes if n not in saved], sorted(set(saved) - set(shapes))
        if missing:
            raise BigtrainError(f"{file.parent} does not match the model: missing {missing[0]}")
        if unexpected:
            raise BigtrainError(f"{file.parent} does not match the model: unexpected {unexpected[:3]}")
        for name, shape in shapes.items():
            if saved[name] != tuple(shape):
                raise BigtrainError(f"{file.parent} does not match the model: {name} has shape "
                                    f"{saved[name]}, the model {tuple(shape)}")

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (OSError, SafetensorError) as e:
            raise BigtrainError(f"cannot load weights from {self.file.parent}: {e}") from None

    def read(self, name: str, dim: int | None = None, parts: int = 1, part: int = 0) -> torch.Tensor:
        """Tensor `name`, or only its `part`-th of `parts` equal slices along `dim`."""
        view = self._call(self.handle.get_slice, name)
        if dim is None or parts == 1:
            return self._call(lambda: view[:])
        size = view.get_shape()[dim] // parts
        index = tuple(slice(part * size, (part + 1) * size) if d == dim else slice(None) for d in range(dim + 1))
        return self._call(lambda: view[index])
