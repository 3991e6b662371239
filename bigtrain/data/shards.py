"""Shard format (Arrow IPC stream, one row of tokens per document) and the dataset manifest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

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
        "sha256": hashlib.sha256(buf).hexdigest(),
    }


def _open_shard(path: Path) -> pa.ListArray:
    """Memory-map a shard and return its token column (one batch, zero copy)."""
    if not path.is_file():
        raise BigtrainError(f"shard not found: {path}")
    try:
        batches = list(pa.ipc.open_stream(pa.memory_map(str(path), "r")))
    except (pa.ArrowException, OSError) as e:
        raise BigtrainError(f"{path} is not a readable Arrow shard: {e}") from e
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


def read_shard_tokens(path: Path) -> np.ndarray:
    """All tokens of a shard, documents concatenated, as a read-only view of the memory map."""
    column = _open_shard(Path(path))
    start, end = column.offsets[0].as_py(), column.offsets[-1].as_py()
    return column.values.slice(start, end - start).to_numpy(zero_copy_only=True)


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write `out_dir/manifest.json` atomically; its presence marks a complete dataset."""
    write_atomic(Path(out_dir) / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


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
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BigtrainError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BigtrainError(f"{path} is not a {FORMAT} manifest")
    for key in ("tokenizer", "shards", "totals"):
        if key not in manifest:
            raise BigtrainError(f"{path} has no '{key}' entry")
    return manifest


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def verify_dataset(data_dir: Path | str) -> dict:
    """Check every shard's presence, checksum and counts against the manifest; return totals."""
    data_dir = Path(data_dir)
    manifest = load_manifest(data_dir)
    documents = tokens = 0
    for entry in manifest["shards"]:
        path = data_dir / entry["file"]
        if not path.is_file():
            raise BigtrainError(f"shard {path} is missing")
        if _file_sha256(path) != entry["sha256"]:
            raise BigtrainError(f"shard {path} is corrupt: sha256 does not match the manifest")
        column = _open_shard(path)
        found = (len(column), column.offsets[-1].as_py() - column.offsets[0].as_py())
        if found != (entry["documents"], entry["tokens"]):
            raise BigtrainError(
                f"shard {path} holds {found[0]} documents / {found[1]} tokens, "
                f"manifest says {entry['documents']} / {entry['tokens']}"
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
