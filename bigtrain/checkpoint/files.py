"""The files of a checkpoint directory: their sizes and crc32c in `files.json` (written by every
rank for its share during a save), the checks every reader makes against it, the `latest` pointer,
and fsync. Both the checkpoints of a run (`io.py`) and its object-store mirror use these.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import crc32c

from bigtrain.checkpoint.format import FILES, STATE, format_problem

CHUNK = 16 * 2**20  # bytes read at a time for checksums
SHARE_PREFIX = ".files-"  # each rank's checksums during a save, merged into files.json


def file_crc32c(path: Path) -> str:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            value = crc32c.crc32c(chunk, value=value)
    return f"{value:08x}"


def _listed_files(checkpoint: Path) -> list[Path]:
    return [f for f in sorted(checkpoint.rglob("*")) if f.is_file() and f.name != FILES
            and not f.name.startswith(SHARE_PREFIX)]


def write_checksum_share(checkpoint: Path, rank: int, files: list[Path]) -> None:
    """Fsync `files` (the ones this rank wrote into `checkpoint`) and record their sizes and crc32c
    in this rank's share, `.files-<rank>.json`, itself written last and atomically: its presence
    says the rank's files are complete."""
    listed = {}
    for f in files:
        fsync_path(f)
        listed[str(f.relative_to(checkpoint))] = {"bytes": f.stat().st_size, "crc32c": file_crc32c(f)}
    share = checkpoint / f"{SHARE_PREFIX}{rank}.json"
    tmp = share.with_suffix(".tmp")
    tmp.write_text(json.dumps(listed))
    fsync_path(tmp)
    os.replace(tmp, share)


def share_written(checkpoint: Path, rank: int) -> bool:
    return (checkpoint / f"{SHARE_PREFIX}{rank}.json").is_file()


def merge_checksum_shares(checkpoint: Path, world: int) -> None:
    """`files.json` from every rank's share, plus the files no rank listed (the small ones rank 0
    wrote directly: state, config, tokenizer), checksummed and fsync'd here."""
    listed: dict[str, Any] = {}
    for rank in range(world):
        share = checkpoint / f"{SHARE_PREFIX}{rank}.json"
        listed.update(json.loads(share.read_text()))
        share.unlink()
    for f in _listed_files(checkpoint):
        name = str(f.relative_to(checkpoint))
        if name not in listed:
            fsync_path(f)
            listed[name] = {"bytes": f.stat().st_size, "crc32c": file_crc32c(f)}
    (checkpoint / FILES).write_text(json.dumps(dict(sorted(listed.items())), indent=0))
    fsync_path(checkpoint / FILES)
    for directory in {f.parent for f in checkpoint.rglob("*")} | {checkpoint}:
        fsync_path(directory)


def write_file_list(checkpoint: Path) -> None:
    """Record every file's size and crc32c in `files.json` (written last, before the directory is
    renamed), computed by this one process."""
    merge_checksum_shares(checkpoint, 0)


def file_problem(checkpoint: Path, share: tuple[int, int] = (0, 1), checksums: bool = True) -> str | None:
    """What is wrong with the files of `checkpoint` against `files.json` (None: nothing): a missing
    or truncated file (every file), a changed byte (the crc32c of files `share` = (rank, world) holds)."""
    if not (checkpoint / FILES).is_file():
        return None  # written before checkpoints listed their files
    listed = json.loads((checkpoint / FILES).read_text())
    rank, world = share
    for i, (name, entry) in enumerate(listed.items()):
        size, crc = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["crc32c"])
        file = checkpoint / name
        if not file.is_file():
            return f"checkpoint {checkpoint} is incomplete: {name} is missing"
        if file.stat().st_size != size:
            return (f"checkpoint {checkpoint} is damaged: {name} has {file.stat().st_size} bytes, {size} were "
                    f"written{_previous_hint(checkpoint)}")
        if checksums and crc is not None and i % world == rank and file_crc32c(file) != crc:
            return (f"checkpoint {checkpoint} is damaged: {name} does not match the crc32c it was written with"
                    f"{_previous_hint(checkpoint)}")
    return None


def checkpoint_problem(checkpoint: Path, share: tuple[int, int] = (0, 1), checksums: bool = True) -> str | None:
    """Why `checkpoint` cannot be read (None: it can): a missing, truncated or changed file
    (`file_problem`), or a format this bigtrain does not read. Every reader asks this first."""
    return file_problem(checkpoint, share, checksums) or format_problem(checkpoint)


def _previous_hint(checkpoint: Path) -> str:
    older = [c for c in sorted(checkpoint.parent.glob("step-*")) if c.name < checkpoint.name and (c / STATE).is_file()]
    return f"; the previous checkpoint is {older[-1]}: resume with run.resume={older[-1]}" if older else ""


def write_latest(root: Path, name: str) -> None:
    """Point `root/latest` at checkpoint `name` (atomically: written aside, fsync'd, renamed)."""
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(name + "\n")
    fsync_path(pointer_tmp)
    os.replace(pointer_tmp, root / "latest")
    fsync_path(root)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
