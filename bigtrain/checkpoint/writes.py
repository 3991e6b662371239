"""How a save writes its tensor files: at once (`Direct`), or copied into host buffers at the save
step and written later by a background thread (`Staged`, `checkpoint.async`).

Engines write every tensor file of a checkpoint through one of these (`torch_save`,
`safetensors`); each remembers the files it wrote, so that every rank checksums its own.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import copy as shallow_copy
from pathlib import Path
from typing import Any

import safetensors.torch
import torch


class Direct:
    """Write each file when asked."""

    staged_copies = False  # the tensors written are the caller's own

    def __init__(self) -> None:
        self.written: list[Path] = []

    def torch_save(self, obj: Any, path: Path) -> None:
        torch.save(obj, path)
        self.written.append(Path(path))

    def safetensors(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
        safetensors.torch.save_file(tensors, str(path), metadata)
        self.written.append(Path(path))

    def flush(self) -> None:
        """Nothing is pending."""


class Staged(Direct):
    """Copy each file's tensors into host buffers now (pinned when they come from a GPU, and
    reused by the next save when their shapes match) and write the files in `flush`. Containers
    are rebuilt around the copies; other values (numbers, strings) are kept as they are."""

    staged_copies = True

    def __init__(self) -> None:
        super().__init__()
        self.buffers: list[torch.Tensor] = []  # the n-th tensor staged by a save reuses the n-th buffer
        self.used = 0
        self.pending: list[Callable[[], None]] = []
        self.copied: torch.cuda.Event | None = None

    def begin(self) -> None:
        """Start a save (the previous one is written: its buffers are free again)."""
        self.used, self.written, self.pending, self.copied = 0, [], [], None

    def torch_save(self, obj: Any, path: Path) -> None:
        copy = self._copy(obj)
        self.pending.append(lambda: Direct.torch_save(self, copy, path))

    def safetensors(self, tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
        copy = self._copy(tensors)
        self.pending.append(lambda: Direct.safetensors(self, copy, path, metadata))

    def staged(self) -> None:
        """Every file of the save is staged: GPU→host copies are ordered on the current stream, so
        training may go on at once; `flush` waits for them."""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.copied = torch.cuda.Event()
            self.copied.record()

    def flush(self) -> None:
        """Write the staged files (in the background thread)."""
        if self.copied is not None:
            self.copied.synchronize()
        pending, self.pending = self.pending, []
        for write in pending:
            write()

    def bytes(self) -> int:
        """Host memory the staging buffers hold."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def _copy(self, obj: Any, copies: dict[int, Any] | None = None) -> Any:
        """`obj` with its tensors staged and its containers rebuilt; what `obj` holds twice is
        copied once (as `torch.save` and pickle store it once: the file's bytes do not change)."""
        copies = {} if copies is None else copies
        if id(obj) in copies:
            return copies[id(obj)]
        if isinstance(obj, torch.Tensor):
            copy = self._stage(obj.detach())
        elif isinstance(obj, dict):
            copy = shallow_copy(obj)  # the same kind of mapping (OrderedDict, defaultdict …)
            copy.update((key, self._copy(value, copies)) for key, value in obj.items())
        elif isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
            copy = type(obj)(self._copy(value, copies) for value in obj)
        else:
            return obj
        copies[id(obj)] = copy
        return copy

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.used < len(self.buffers):
            buffer = self.buffers[self.used]
            if buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                buffer = self.buffers[self.used] = self._empty(tensor)
        else:
            buffer = self._empty(tensor)
            self.buffers.append(buffer)
        self.used += 1
        return buffer.copy_(tensor, non_blocking=tensor.is_cuda)

    @staticmethod
    def _empty(tensor: torch.Tensor) -> torch.Tensor:
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
