"""`bigtrain data inspect` and `bigtrain data verify` over a prepared directory of either format
(Arrow, MDS, or the `arrow/` + `mds/` pair that `prepare --format mds` writes).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bigtrain.data.mds import MDS_META, load_mds_meta, verify_mds
from bigtrain.data.shards import (
    MANIFEST,
    load_manifest,
    read_document_lengths,
    read_documents,
    verify_dataset,
)
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

SAMPLE_CHARS = 240


def datasets_in(directory: Path | str) -> list[tuple[str, Path]]:
    """(format, directory) of each prepared dataset at `directory` or in its arrow/ and mds/."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BigtrainError(f"data directory not found: {directory}")
    found = []
    for candidate in (directory, directory / "arrow", directory / "mds"):
        if (candidate / MANIFEST).is_file():
            found.append(("arrow", candidate))
        elif (candidate / MDS_META).is_file():
            found.append(("mds", candidate))
    if not found:
        raise BigtrainError(
            f"{directory} has no {MANIFEST} or {MDS_META}: not a prepared dataset "
            "(run `bigtrain prepare`)"
        )
    return found


def verify(directory: Path | str) -> list[str]:
    """Verify every dataset found at `directory`; one summary line each (errors name the shard)."""
    lines = []
    for fmt, path in datasets_in(directory):
        totals = verify_dataset(path) if fmt == "arrow" else verify_mds(path)
        lines.append(f"ok: {path} ({fmt}, {json.dumps(totals)})")
    return lines


def _histogram(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(low, high, count) of document lengths in power-of-two buckets [low, high)."""
    buckets = np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64)
    counts = np.bincount(buckets)
    return [(1 << b, 1 << (b + 1), int(c)) for b, c in enumerate(counts) if c]


def inspect_arrow(path: Path, samples: int) -> dict:
    """Totals, document-length statistics and histogram, and the first documents decoded."""
    manifest = load_manifest(path)
    lengths = np.concatenate(
        [read_document_lengths(path / s["file"]) for s in manifest["shards"]] or [np.zeros(0)]
    )
    tokenizer = TextTokenizer.load(path / manifest["tokenizer"]["file"])
    texts: list[str] = []
    for entry in manifest["shards"]:
        if len(texts) >= samples:
            break
        docs = read_documents(path / entry["file"], samples - len(texts))
        texts += [tokenizer.decode(doc) for doc in docs]
    return {
        "path": str(path),
        "format": "arrow",
        "token_dtype": manifest["token_dtype"],
        "tokenizer": manifest["tokenizer"],
        "totals": manifest["totals"],
        "lengths": {
            "min": int(lengths.min()),
            "median": float(np.median(lengths)),
            "mean": float(lengths.mean()),
            "p99": float(np.percentile(lengths, 99)),
            "max": int(lengths.max()),
        },
        "histogram": _histogram(lengths),
        "samples": texts,
        "problems": manifest.get("problems", []),
    }


def inspect_mds(path: Path, samples: int) -> dict:
    """The conversion record, streaming's shard count, and the first windows decoded."""
    from streaming import StreamingDataset  # slow to import: only for MDS datasets

    meta = load_mds_meta(path)
    index = json.loads((path / "index.json").read_text())
    tokenizer = TextTokenizer.load(path / "tokenizer.json")
    dataset = StreamingDataset(local=str(path), batch_size=1)
    texts = [tokenizer.decode(dataset[i]["tokens"]) for i in range(min(samples, meta["windows"]))]
    return {
        "path": str(path),
        "format": "mds",
        "token_dtype": meta["token_dtype"],
        "tokenizer": meta["tokenizer"],
        "totals": {"shards": len(index["shards"]), "windows": meta["windows"],
                   "seq_len": meta["seq_len"], "tokens": meta["tokens"]},
        "samples": texts,
    }


def inspect(directory: Path | str, samples: int = 3) -> list[dict]:
    """One report per dataset found at `directory` (see `datasets_in`)."""
    return [
        inspect_arrow(path, samples) if fmt == "arrow" else inspect_mds(path, samples)
        for fmt, path in datasets_in(directory)
    ]


def format_report(report: dict) -> str:
    """A report as the lines `bigtrain data inspect` prints."""
    tok = report["tokenizer"]
    lines = [
        f"{report['path']} ({report['format']}, tokens {report['token_dtype']}, "
        f"tokenizer {tok['sha256'][:12]} vocab {tok['vocab_size']:,})",
        "totals    " + ", ".join(f"{k} {v:,}" for k, v in report["totals"].items()),
    ]
    if "lengths" in report:
        stats = report["lengths"]
        lines.append("doc len   " + ", ".join(f"{k} {v:,.0f}" for k, v in stats.items()))
        peak = max(c for _, _, c in report["histogram"])
        for low, high, count in report["histogram"]:
            bar = "█" * max(1, round(40 * count / peak))
            lines.append(f"  [{low:>7,}, {high:>7,})  {count:>9,}  {bar}")
    for problem in report.get("problems", []):
        lines.append(f"problem   {problem}")
    for i, text in enumerate(report["samples"]):
        shown = text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"
        lines.append(f"sample {i}  " + shown.replace("\n", "\n          "))
    return "\n".join(lines)
