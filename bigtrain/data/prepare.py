"""Raw text (.txt / .jsonl files) -> tokenized Arrow shards + manifest, one shard in memory."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import accumulate
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

import bigtrain
from bigtrain.data.shards import (
    FORMAT,
    MANIFEST,
    token_dtype,
    write_atomic,
    write_manifest,
    write_shard,
)
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

SUFFIXES = (".txt", ".jsonl")
ENCODE_BATCH = 256
TOKENIZER_FILE = "tokenizer.json"


def _input_files(inputs: list[Path | str]) -> list[Path]:
    """Expand inputs (files, or directories searched recursively) into .txt/.jsonl files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not found:
                raise BigtrainError(f"no .txt or .jsonl files under {path}")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise BigtrainError(f"unsupported input {path}: expected .txt or .jsonl")
            files.append(path)
        else:
            raise BigtrainError(f"input not found: {path}")
    if not files:
        raise BigtrainError("no input files given")
    return files


def _documents(path: Path, text_field: str) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes read) from one input file; blank .jsonl lines are skipped."""
    if path.suffix == ".txt":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BigtrainError(f"{path} is not UTF-8 text: {e}") from e
        yield text, len(data)
        return
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (ValueError, KeyError, TypeError) as e:
                raise BigtrainError(
                    f"{path} line {line_no}: not a JSON object with a '{text_field}' field"
                ) from e
            if not isinstance(text, str):
                raise BigtrainError(f"{path} line {line_no}: '{text_field}' is not a string")
            yield text, len(line)


def iter_documents(inputs: list[Path | str], text_field: str = "text") -> Iterator[str]:
    """Every document's text from `inputs` (files or directories of .txt/.jsonl), in order."""
    for path in _input_files(inputs):
        for text, _ in _documents(path, text_field):
            yield text


class _ShardWriter:
    """Buffers encoded documents and writes a shard each time `shard_tokens` are buffered."""

    def __init__(self, out_dir: Path, shard_tokens: int, dtype: np.dtype) -> None:
        self.out_dir, self.shard_tokens, self.dtype = out_dir, shard_tokens, dtype
        self.entries: list[dict] = []
        self.tokens = 0  # written and buffered
        self._docs: list[np.ndarray] = []
        self._buffered = 0

    def add(self, doc: np.ndarray) -> None:
        self._docs.append(doc)
        self._buffered += len(doc)
        self.tokens += len(doc)
        if self._buffered >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._docs:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"shard-{len(self.entries):05d}.arrow"
        self.entries.append(write_shard(path, self._docs, self.dtype))
        self._docs, self._buffered = [], 0


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BigtrainError(f"output {out_dir} exists and is not a directory")
    if (out_dir / MANIFEST).exists():
        raise BigtrainError(f"{out_dir} already holds a prepared dataset; choose another --out")
    leftovers = sorted(out_dir.glob("shard-*.arrow")) + sorted(out_dir.glob(TOKENIZER_FILE))
    if leftovers:
        raise BigtrainError(
            f"{out_dir} holds files of an unfinished prepare ({leftovers[0].name}); "
            "remove them or choose another --out"
        )


def _progress() -> Progress:
    return Progress(
        TextColumn("prepare"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[tokens]:,} tokens"),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )


def prepare(
    inputs: list[Path | str],
    tokenizer_path: Path | str,
    out_dir: Path | str,
    shard_tokens: int = 2**24,
    text_field: str = "text",
) -> dict:
    """Tokenize `inputs` into `out_dir` (shards, tokenizer copy, manifest); returns the manifest.

    Each non-empty document becomes one row of tokens ending with EOS; empty ones are counted.
    """
    if shard_tokens < 1:
        raise BigtrainError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    files = _input_files(inputs)
    tokenizer = TextTokenizer.load(tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = _ShardWriter(out_dir, shard_tokens, dtype)
    empty = 0

    def encode(texts: list[str]) -> None:
        nonlocal empty
        for ids in tokenizer.encode_batch(texts):
            if not ids:
                empty += 1
                continue
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = tokenizer.eos_id
            writer.add(doc)

    sizes = [f.stat().st_size for f in files]
    with _progress() as progress:
        task = progress.add_task("prepare", total=sum(sizes), tokens=0)
        batch: list[str] = []
        for path, done in zip(files, accumulate(sizes), strict=True):
            for text, nbytes in _documents(path, text_field):
                batch.append(text)
                progress.advance(task, nbytes)
                if len(batch) == ENCODE_BATCH:
                    encode(batch)
                    batch = []
                    progress.update(task, tokens=writer.tokens)
            progress.update(task, completed=done)
        encode(batch)
        writer.flush()
        progress.update(task, tokens=writer.tokens)

    totals = {
        "documents": sum(e["documents"] for e in writer.entries),
        "tokens": sum(e["tokens"] for e in writer.entries),
        "empty_documents_skipped": empty,
        "shards": len(writer.entries),
    }
    if totals["tokens"] == 0:
        raise BigtrainError(
            f"no text found in inputs {', '.join(map(str, inputs))} ({empty} documents, all empty)"
        )
    write_atomic(out_dir / TOKENIZER_FILE, Path(tokenizer_path).read_bytes())
    manifest = {
        "format": FORMAT,
        "bigtrain_version": bigtrain.__version__,
        "tokenizer": {
            "sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "file": TOKENIZER_FILE,
        },
        "token_dtype": dtype.name,
        "shards": writer.entries,
        "totals": totals,
        "sources": [str(f.resolve()) for f in files],
        "args": {
            "inputs": [str(i) for i in inputs],
            "tokenizer": str(tokenizer_path),
            "shard_tokens": shard_tokens,
            "text_field": text_field,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(out_dir, manifest)
    return manifest
