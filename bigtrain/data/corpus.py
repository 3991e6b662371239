"""The embedded default corpus: the standard library's Python source, present on every install."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from bigtrain.errors import BigtrainError

CORPUS_RECORD = "corpus.json"
_THIRD_PARTY_DIRS = {"site-packages", "dist-packages"}


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources() -> list[Path]:
    """Every `.py` file of the standard library (no third-party packages), by relative path."""
    root = _stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _THIRD_PARTY_DIRS]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _path_hash(rel: str) -> str:
    return hashlib.sha256(rel.encode()).hexdigest()


def _is_val(rel: str, val_fraction: float) -> bool:
    return int(_path_hash(rel)[:8], 16) / 2**32 < val_fraction


def _documents(val_fraction: float, max_mb: float | None) -> Iterator[tuple[str, str, bool]]:
    """Yield (relative path, text, is_val) of decodable files.

    With `max_mb`, a hash-ordered subset in which val holds `val_fraction` of the bytes: each
    split takes files until its share of the budget is used up.
    """
    root = _stdlib_root()
    rels = [p.relative_to(root).as_posix() for p in stdlib_sources()]
    budget = {True: math.inf, False: math.inf}
    if max_mb is not None:
        # Order by the digits the split does not use, so the subset is not biased towards val.
        rels.sort(key=lambda rel: _path_hash(rel)[8:])
        budget = {True: max_mb * 1e6 * val_fraction, False: max_mb * 1e6 * (1 - val_fraction)}
    for rel in rels:
        is_val = _is_val(rel, val_fraction)
        if budget[is_val] <= 0:
            continue
        data = (root / rel).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        budget[is_val] -= len(data)
        yield rel, text, is_val


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_default_corpus(
    out_dir: Path, val_fraction: float = 0.05, max_mb: float | None = None
) -> tuple[Path, Path]:
    """Write the stdlib corpus as `train.jsonl`/`val.jsonl` in `out_dir`, split by path hash.

    A previous output made with the same arguments (recorded in `corpus.json`) is reused as is.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise BigtrainError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_mb is not None and max_mb <= 0:
        raise BigtrainError(f"max_mb must be positive, got {max_mb}")
    out_dir = Path(out_dir)
    train_path, val_path = out_dir / "train.jsonl", out_dir / "val.jsonl"
    record_path = out_dir / CORPUS_RECORD
    args = {
        "val_fraction": val_fraction,
        "max_mb": max_mb,
        "stdlib": str(_stdlib_root()),
        "python": platform.python_version(),
    }
    if record_path.exists():
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            record = {}  # unreadable record: regenerate the corpus
        reusable = isinstance(record, dict) and record.get("args") == args
        if reusable and train_path.exists() and val_path.exists():
            return train_path, val_path
    else:
        for path in (train_path, val_path):
            if path.exists():
                raise BigtrainError(
                    f"{path} exists and was not written by bigtrain; choose another directory"
                )

    train: list[str] = []
    val: list[str] = []
    for rel, text, is_val in _documents(val_fraction, max_mb):
        line = json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n"
        (val if is_val else train).append(line)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(train_path, "".join(train))
    _write_text_atomic(val_path, "".join(val))
    record = {"args": args, "train_documents": len(train), "val_documents": len(val)}
    _write_text_atomic(record_path, json.dumps(record, indent=2) + "\n")
    return train_path, val_path
