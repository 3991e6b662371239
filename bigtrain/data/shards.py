"""Shard format (Arrow IPC stream, one row of tokens per document) and the dataset manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError, first_line

MANIFEST = "manifest.json"
FORMAT = "bigtrain-arrow-v1"
TOKENS_COLUMN = "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id of the vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def write_atomic(path: Path, data: bytes | memoryview | pa.Buffer) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(path: Path, docs: list[np.ndarray], dtype: np.dtype) -> dict:
    """Write documents (token arrays, EOS included) as one shard; returns its manifest entry."""
    path = Path(path)
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    if lengths.sum() > np.iinfo(np.int32).max:
        raise BigtrainError(f"{path}: {lengths.sum()} tokens exceed one shard's 2**31 - 1 limit")
    offsets = np.zeros(len(docs) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(docs).astype(dtype, copy=False) if docs else np.empty(0, dtype)
    column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    batch = pa.record_batch([column], names=[TOKENS_COLUMN])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    buf = sink.getvalue()
    write_atomic(path, buf)
    return {
        "file": path.name,
        "documents": len(docs),
        "tokens": int(lengths.sum()),
        "bytes": buf.size,
        "sha256": hashlib.sha256(buf).hexdigest(),
        "max_token_id": int(values.max()) if len(values) else -1,
    }


class ShardWriter:
    """Buffers documents and writes `{prefix}-KKKK.arrow` each time `shard_tokens` are buffered."""

    def __init__(self, out_dir: Path, prefix: str, shard_tokens: int, dtype: np.dtype) -> None:
        self.out_dir, self.prefix = Path(out_dir), prefix
        self.shard_tokens, self.dtype = shard_tokens, dtype
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
        path = self.out_dir / f"{self.prefix}-{len(self.entries):04d}.arrow"
        self.entries.append(write_shard(path, self._docs, self.dtype))
        self._docs, self._buffered = [], 0


def _open_shard(path: Path, expected_bytes: int | None = None) -> pa.ListArray:
    """Memory-map a shard and return its token column (one batch, zero copy).

    With `expected_bytes` (from the manifest), a shard of another size is reported as truncated
    or altered before Arrow reads it.
    """
    if not path.is_file():
        raise BigtrainError(f"shard {path} is missing")
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise BigtrainError(
            f"shard {path} is truncated or altered: {size} bytes, manifest says {expected_bytes} "
            "(run `bigtrain data verify`)"
        )
    try:
        batches = list(pa.ipc.open_stream(pa.memory_map(str(path), "r")))
    except (pa.ArrowException, OSError) as e:
        raise BigtrainError(f"{path} is not a readable Arrow shard: {first_line(e)}") from e
    types = (pa.list_(pa.uint16()), pa.list_(pa.uint32()))
    if (
        len(batches) != 1
        or batches[0].schema.names != [TOKENS_COLUMN]
        or batches[0].column(0).type not in types
    ):
        raise BigtrainError(
            f"{path} is not a bigtrain shard (one record batch, column {TOKENS_COLUMN}: list<uint>)"
        )
    return batches[0].column(0)


def read_shard_tokens(path: Path, expected_bytes: int | None = None) -> np.ndarray:
    """All tokens of a shard, documents concatenated, as a read-only view of the memory map."""
    column = _open_shard(Path(path), expected_bytes)
    start, end = column.offsets[0].as_py(), column.offsets[-1].as_py()
    return column.values.slice(start, end - start).to_numpy(zero_copy_only=True)


def read_documents(path: Path, count: int) -> list[np.ndarray]:
    """The first `count` documents of a shard, as token arrays (views of the memory map)."""
    column = _open_shard(Path(path))
    return [doc.values.to_numpy(zero_copy_only=True) for doc in column[:count]]


def read_document_lengths(path: Path) -> np.ndarray:
    """Token count of every document of a shard (EOS included)."""
    return np.diff(_open_shard(Path(path)).offsets.to_numpy())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard_checksum(path: Path, sha256: str) -> None:
    """Raise naming the shard when its bytes do not hash to the manifest's sha256."""
    if file_sha256(path) != sha256:
        raise BigtrainError(f"shard {path} is corrupt: sha256 does not match the manifest")


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write `out_dir/manifest.json` atomically; its presence marks a complete dataset."""
    write_atomic(Path(out_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_format_json(path: Path, expected_format: str, kind: str) -> dict:
    """Read a JSON object whose `format` entry must be `expected_format`."""
    try:
        record = json.loads(path.read_text())
    except ValueError as e:
        raise BigtrainError(f"{path} is not valid JSON: {first_line(e)}") from e
    if not isinstance(record, dict) or record.get("format") != expected_format:
        raise BigtrainError(f"{path} is not a {expected_format} {kind}")
    return record


def load_manifest(data_dir: Path | str) -> dict:
    """Read and sanity-check the manifest of a prepared dataset."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise BigtrainError(f"data directory not found: {data_dir}")
    path = data_dir / MANIFEST
    if not path.is_file():
        raise BigtrainError(
            f"{data_dir} has no {MANIFEST}: not a prepared dataset (run `bigtrain prepare`)"
        )
    manifest = read_format_json(path, FORMAT, "manifest")
    for key in ("tokenizer", "shards", "totals"):
        if key not in manifest:
            raise BigtrainError(f"{path} has no '{key}' entry")
    return manifest


def verify_dataset(data_dir: Path | str) -> dict:
    """Check every shard's size, checksum, counts and largest token id against the manifest.

    Returns the totals; the first mismatch raises an error naming the shard.
    """
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    documents = tokens = 0
    for entry in manifest["shards"]:
        path = data_dir / entry["file"]
        column = _open_shard(path, entry["bytes"])
        check_shard_checksum(path, entry["sha256"])
        values = column.values.to_numpy(zero_copy_only=True)
        found = (len(column), len(values), int(values.max()) if len(values) else -1)
        recorded = (entry["documents"], entry["tokens"], entry["max_token_id"])
        if found != recorded:
            raise BigtrainError(
                f"shard {path} holds {found[0]} documents / {found[1]} tokens / max token id "
                f"{found[2]}, manifest says {recorded[0]} / {recorded[1]} / {recorded[2]}"
            )
        documents += found[0]
        tokens += found[1]
    totals = {"shards": len(manifest["shards"]), "documents": documents, "tokens": tokens}
    expected = {k: manifest["totals"][k] for k in totals}
    if totals != expected:
        raise BigtrainError(f"{data_dir / MANIFEST}: totals {expected} but shards hold {totals}")
    tokenizer_path = data_dir / manifest["tokenizer"]["file"]
    if TextTokenizer.load(tokenizer_path).sha256 != manifest["tokenizer"]["sha256"]:
        raise BigtrainError(f"{tokenizer_path} does not match the manifest's tokenizer sha256")
    return totals
