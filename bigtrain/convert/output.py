"""Writing a conversion's output directory: all or nothing, and never over existing data by accident."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from bigtrain.errors import BigtrainError


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Fail before any work when OUT exists and --overwrite was not given."""
    if out.exists() and not overwrite:
        raise BigtrainError(f"{out} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def output_dir(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `out`; on success it becomes `out` (replacing the old
    one only with `overwrite`); on failure it is removed and `out` is untouched."""
    out = Path(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
