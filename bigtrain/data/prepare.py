"""Raw text -> tokenized Arrow shards + manifest, in parallel worker processes, restartable.

The inputs are planned into units of about `unit_bytes` (whole small files grouped, large plain
.jsonl files cut at byte offsets, Parquet files cut at row groups). Each unit is tokenized by one
worker into its own shards `shard-UUUUUU-KKKK.arrow`, so memory stays at about one shard per
worker and the output does not depend on the number of workers. A finished unit is recorded in
`.prepare/`; a re-run with the same arguments skips recorded units. The manifest is written last.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

import bigtrain
from bigtrain.data.shards import (
    FORMAT,
    MANIFEST,
    ShardWriter,
    token_dtype,
    write_atomic,
    write_manifest,
)
from bigtrain.data.sources import MAX_PROBLEMS, InputFile, ReadStats, find_inputs, read_texts
from bigtrain.data.tokenizer import TextTokenizer
from bigtrain.errors import BigtrainError

TOKENIZER_FILE = "tokenizer.json"
STATE_DIR = ".prepare"  # plan and finished-unit records of a prepare in progress
PLAN_FILE = "plan.json"
BYTES_PER_TOKEN = 4  # rough text bytes per token, to size units to about one shard
MIN_UNIT_BYTES = 1 << 20
MIN_UNITS = 64  # large enough inputs are cut into at least this many units (parallelism)
ENCODE_DOCS, ENCODE_CHARS = 1024, 1 << 20  # one encode_batch call (~100 B/token while encoding)


@dataclass(frozen=True)
class Piece:
    """Part of one input file: a byte range (.jsonl), row groups (.parquet) or the whole file."""

    file: int
    start: int
    stop: int
    bytes: int


def iter_documents(inputs: list[Path | str], text_field: str = "text") -> Iterator[str]:
    """Every readable document's text from `inputs`, in order (bad records skipped)."""
    stats = ReadStats()
    for f in find_inputs(inputs, text_field):
        for text, _ in read_texts(f, 0, f.extent, text_field, False, stats):
            if text is not None:
                yield text


def _pieces(f: InputFile, index: int, unit_bytes: int) -> list[Piece]:
    """File `index` cut into pieces of at most about `unit_bytes` where its format allows."""
    if f.format == "jsonl" and f.bytes > unit_bytes:
        n = math.ceil(f.bytes / unit_bytes)
        cuts = [f.bytes * i // n for i in range(n + 1)]
        return [Piece(index, a, b, b - a) for a, b in zip(cuts, cuts[1:], strict=False)]
    if f.format == "parquet":
        rows = sum(f.row_groups) or 1
        pieces, start, size = [], 0, 0
        for group, n in enumerate(f.row_groups):
            size += f.bytes * n // rows
            if size >= unit_bytes or group == len(f.row_groups) - 1:
                pieces.append(Piece(index, start, group + 1, size))
                start, size = group + 1, 0
        return pieces
    return [Piece(index, 0, f.extent, f.bytes)]


def plan_units(files: list[InputFile], shard_tokens: int) -> tuple[int, list[list[Piece]]]:
    """Cut the inputs into units of about `unit_bytes`; returns (unit_bytes, units)."""
    total = sum(f.bytes for f in files)
    unit_bytes = max(MIN_UNIT_BYTES, min(BYTES_PER_TOKEN * shard_tokens, -(-total // MIN_UNITS)))
    units: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for index, f in enumerate(files):
        for piece in _pieces(f, index, unit_bytes):
            if current and size + piece.bytes > unit_bytes:
                units.append(current)
                current, size = [], 0
            current.append(piece)
            size += piece.bytes
    if current:
        units.append(current)
    return unit_bytes, units


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs to tokenize one unit into shards."""

    index: int
    pieces: tuple[tuple[InputFile, Piece], ...]
    out_dir: str
    tokenizer: str
    shard_tokens: int
    text_field: str
    strict: bool


_tokenizers: dict[str, TextTokenizer] = {}
_shared_progress = None  # a multiprocessing.Value of input bytes read, set in pool workers


def _init_worker(progress, threads: int) -> None:
    global _shared_progress
    # The tokenizer's thread pool gets this worker's share of the cores, not all of them.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _shared_progress = progress


def _report_to_shared(nbytes: int) -> None:
    with _shared_progress.get_lock():
        _shared_progress.value += nbytes


def run_unit(job: UnitJob, progress: Callable[[int], None] | None = None) -> dict:
    """Tokenize one unit into its shards; returns its record (shard entries and counts)."""
    if job.tokenizer not in _tokenizers:
        _tokenizers[job.tokenizer] = TextTokenizer.load(job.tokenizer)
    tokenizer = _tokenizers[job.tokenizer]
    report = progress or (_report_to_shared if _shared_progress is not None else lambda n: None)
    dtype = token_dtype(tokenizer.vocab_size)
    writer = ShardWriter(Path(job.out_dir), f"shard-{job.index:06d}", job.shard_tokens, dtype)
    stats = ReadStats()
    empty = 0
    batch: list[str] = []
    chars = pending = 0

    def encode() -> None:
        nonlocal empty, chars, pending
        for ids in tokenizer.encode_batch(batch):
            if not ids:
                empty += 1
                continue
            doc = np.empty(len(ids) + 1, dtype=dtype)
            doc[:-1] = ids
            doc[-1] = tokenizer.eos_id
            writer.add(doc)
        report(pending)
        batch.clear()
        chars = pending = 0

    for f, piece in job.pieces:
        for text, nbytes in read_texts(f, piece.start, piece.stop, job.text_field, job.strict, stats):
            pending += nbytes
            if text is None:
                continue
            batch.append(text)
            chars += len(text)
            if len(batch) >= ENCODE_DOCS or chars >= ENCODE_CHARS:
                encode()
    encode()
    writer.flush()
    return {
        "unit": job.index,
        "shards": writer.entries,
        "empty_documents_skipped": empty,
        "bad_records_skipped": stats.bad_records,
        "documents_with_invalid_utf8": stats.invalid_utf8,
        "problems": stats.problems,
    }


def _check_out_dir(out_dir: Path, plan: dict) -> set[int]:
    """Refuse a finished or foreign output directory; return the units an earlier run finished."""
    if out_dir.exists() and not out_dir.is_dir():
        raise BigtrainError(f"output {out_dir} exists and is not a directory")
    if (out_dir / MANIFEST).exists():
        raise BigtrainError(f"{out_dir} already holds a prepared dataset; choose another --out")
    state = out_dir / STATE_DIR
    if not (state / PLAN_FILE).is_file():
        entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
        if entries:
            raise BigtrainError(
                f"{out_dir} is not empty ({entries[0].name}) and holds no unfinished prepare; "
                "choose an empty or new --out"
            )
        return set()
    try:
        earlier = json.loads((state / PLAN_FILE).read_text())
    except ValueError as e:
        raise BigtrainError(f"{state / PLAN_FILE} is not valid JSON: {e}") from e
    if earlier != plan:
        changed = [k for k in plan if earlier.get(k) != plan[k]]
        raise BigtrainError(
            f"{out_dir} holds an unfinished prepare with other {', '.join(changed) or 'settings'}; "
            "re-run it with the same arguments and inputs, or choose another --out"
        )
    done = set()
    for record_path in state.glob("unit-*.json"):
        record = json.loads(record_path.read_text())
        shards = [out_dir / s["file"] for s in record["shards"]]
        sizes_ok = all(p.is_file() and p.stat().st_size == s["bytes"]
                       for p, s in zip(shards, record["shards"], strict=True))
        if sizes_ok:
            done.add(record["unit"])
    return done


def _progress() -> Progress:
    return Progress(
        TextColumn("prepare"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not sys.stderr.isatty(),
    )


def _run_jobs(jobs: list[UnitJob], workers: int, on_done: Callable[[dict], None],
              progress: Callable[[int], None]) -> None:
    """Run the jobs inline (one worker) or in a pool of spawned processes, recording each.

    The first failure ends the pool: queued units are cancelled and the units already handed to
    workers finish and are recorded (a re-run skips them). Units are handed out in order, so every
    unit before a failed one has run by then, and the error raised is that of the first failed
    unit: under `strict`, the first bad record of the inputs, whatever the timing. A worker that
    dies without an error (a signal, the OOM killer) breaks the pool instead of hanging it.
    """
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(run_unit(job, progress))
        return
    ctx = multiprocessing.get_context("spawn")
    shared = ctx.Value("q", 0)
    seen = 0
    processes = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // processes)
    pool = ProcessPoolExecutor(max_workers=processes, mp_context=ctx, initializer=_init_worker,
                               initargs=(shared, threads))
    units: dict[Future, int] = {}
    pending: set[Future] = set()
    try:
        units = {pool.submit(run_unit, job): job.index for job in jobs}
        pending = set(units)
        while pending:
            done, pending = wait(pending, timeout=0.25, return_when=FIRST_EXCEPTION)
            now = shared.get_obj().value  # no lock: a worker killed holding it must not hang us
            progress(now - seen)
            seen = now
            for future in done:
                if future.exception() is None:
                    on_done(future.result())
            if any(future.exception() is not None for future in done):
                break
    finally:
        for future in pending:
            future.cancel()  # only queued units; running ones finish
        pool.shutdown(wait=True, cancel_futures=True)
    for future in pending:
        if not future.cancelled() and future.exception() is None:
            on_done(future.result())
    failed = [f for f in units if not f.cancelled() and f.exception() is not None]
    if failed:
        _raise_failure(min(failed, key=units.__getitem__))


def _raise_failure(future: Future) -> None:
    """Raise a failed unit's own error, or one line if its worker process died."""
    try:
        future.result()
    except BrokenProcessPool as e:
        raise BigtrainError(
            f"a prepare worker process died without an error ({type(e).__name__}: killed by a "
            "signal or out of memory?); finished units are kept: re-run the same command to resume"
        ) from None


def _totals(records: list[dict], total_bytes: int) -> dict:
    shards = [s for r in records for s in r["shards"]]
    return {
        "shards": len(shards),
        "documents": sum(s["documents"] for s in shards),
        "tokens": sum(s["tokens"] for s in shards),
        "max_token_id": max((s["max_token_id"] for s in shards), default=-1),
        "empty_documents_skipped": sum(r["empty_documents_skipped"] for r in records),
        "bad_records_skipped": sum(r["bad_records_skipped"] for r in records),
        "documents_with_invalid_utf8": sum(r["documents_with_invalid_utf8"] for r in records),
        "input_bytes": total_bytes,
    }


def prepare(
    inputs: list[Path | str],
    tokenizer_path: Path | str,
    out_dir: Path | str,
    shard_tokens: int = 2**24,
    text_field: str = "text",
    workers: int = 1,
    strict: bool = False,
) -> dict:
    """Tokenize `inputs` into `out_dir` (shards, tokenizer copy, manifest); returns the manifest.

    Each non-empty document becomes one row of tokens ending with EOS; empty documents, blank
    lines and (unless `strict`) records that are not JSON objects with `text_field` are skipped
    and counted; invalid UTF-8 is replaced and counted.
    """
    if shard_tokens < 1:
        raise BigtrainError(f"shard_tokens must be positive, got {shard_tokens}")
    if workers < 1:
        raise BigtrainError(f"workers must be positive, got {workers}")
    out_dir = Path(out_dir)
    files = find_inputs(inputs, text_field)
    tokenizer = TextTokenizer.load(tokenizer_path)
    unit_bytes, units = plan_units(files, shard_tokens)
    plan = {
        "tokenizer_sha256": tokenizer.sha256,
        "shard_tokens": shard_tokens,
        "text_field": text_field,
        "strict": strict,
        "unit_bytes": unit_bytes,
        "files": [f.to_json() for f in files],
    }
    done = _check_out_dir(out_dir, plan)
    created = not out_dir.exists()
    state = out_dir / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    write_atomic(state / PLAN_FILE, json.dumps(plan, indent=1).encode())
    jobs = [
        UnitJob(i, tuple((files[p.file], p) for p in pieces), str(out_dir),
                str(Path(tokenizer_path).resolve()), shard_tokens, text_field, strict)
        for i, pieces in enumerate(units)
        if i not in done
    ]
    total_bytes = sum(f.bytes for f in files)

    with _progress() as bar:
        task = bar.add_task("prepare", total=total_bytes)
        bar.update(task, completed=sum(p.bytes for i in done for p in units[i]))

        def record(unit: dict) -> None:
            name = f"unit-{unit['unit']:06d}.json"
            write_atomic(state / name, json.dumps(unit).encode())

        _run_jobs(jobs, workers, record, lambda n: bar.advance(task, n))

    records = [json.loads((state / f"unit-{i:06d}.json").read_text()) for i in range(len(units))]
    totals = _totals(records, total_bytes)
    if totals["tokens"] == 0:
        if created:
            shutil.rmtree(out_dir)  # only our own empty bookkeeping: no shard was written
        raise BigtrainError(
            f"no text found in inputs {', '.join(map(str, inputs))} "
            f"({totals['empty_documents_skipped']} documents, all empty; "
            f"{totals['bad_records_skipped']} bad records)"
        )
    for leftover in out_dir.glob(".shard-*.tmp-*"):
        leftover.unlink()  # a shard write that a killed run left unfinished (redone since)
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
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "shards": [s for r in records for s in r["shards"]],
        "totals": totals,
        "problems": [p for r in records for p in r["problems"]][:MAX_PROBLEMS],
        "sources": [{"path": f.path, "format": f.format, "bytes": f.bytes} for f in files],
        "args": {
            "inputs": [str(i) for i in inputs],
            "tokenizer": str(tokenizer_path),
            "shard_tokens": shard_tokens,
            "text_field": text_field,
            "strict": strict,
            "workers": workers,
            "unit_bytes": unit_bytes,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(out_dir, manifest)
    shutil.rmtree(state)  # the manifest now records everything the unit records held
    return manifest
