"""Raw inputs for `prepare`: find .txt, .jsonl (plain, .gz, .zst), .parquet and HF Arrow files,
and read their documents' text, counting (or, under `strict`, refusing) bad records.
"""

from __future__ import annotations

import glob
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bigtrain.errors import BigtrainError, first_line

# File-name endings that `prepare` reads, and the format each one is.
FORMATS = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
MAX_PROBLEMS = 20  # problems kept verbatim (file:line: what) per unit and in the manifest
_CODECS = {"jsonl.gz": "gzip", "jsonl.zst": "zstd"}
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    """One input file as planned: its path, format, size and modification time."""

    path: str
    format: str
    bytes: int
    mtime_ns: int
    row_groups: tuple[int, ...] = ()  # parquet: rows per row group

    def to_json(self) -> dict:
        return {**self.__dict__, "row_groups": list(self.row_groups)}

    @property
    def extent(self) -> int:
        """The end of the whole file in piece units: row groups for Parquet, bytes otherwise."""
        return len(self.row_groups) if self.format == "parquet" else self.bytes


@dataclass
class ReadStats:
    """What reading skipped or repaired, with the first few places (`file:line: what`)."""

    bad_records: int = 0
    invalid_utf8: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, where: str, what: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"{where}: {what}")


def format_of(path: Path) -> str | None:
    """The input format of `path` by its name ending, or None when `prepare` does not read it."""
    name = path.name.lower()
    return next((fmt for end, fmt in FORMATS.items() if name.endswith(end)), None)


def _describe(path: Path, text_field: str) -> InputFile:
    """Plan one file; tables are checked for a string column `text_field` before any work."""
    fmt = format_of(path)
    if fmt is None:
        raise BigtrainError(f"unsupported input {path}: expected one of {', '.join(FORMATS)}")
    stat = path.stat()
    row_groups: tuple[int, ...] = ()
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise BigtrainError(f"{path} is not a readable Parquet file: {first_line(e)}") from e
        _check_column(parquet.schema_arrow, path, text_field)
        meta = parquet.metadata
        row_groups = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    elif fmt == "arrow":
        _check_column(_open_arrow(path).schema, path, text_field)
    return InputFile(str(path.resolve()), fmt, stat.st_size, stat.st_mtime_ns, row_groups)


def find_inputs(inputs: list[Path | str], text_field: str = "text") -> list[InputFile]:
    """Expand files, directories (searched recursively) and glob patterns into input files.

    Directories and globs contribute the files of a known format in sorted order; a file named
    explicitly must be of a known format.
    """
    files: list[InputFile] = []
    for item in inputs:
        text = str(item)
        if _GLOB_CHARS & set(text) and not Path(text).exists():
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True))
            found = [p for p in matches if p.is_file() and format_of(p)]
            if not found:
                raise BigtrainError(f"no input files match {text}")
            files += [_describe(p, text_field) for p in found]
            continue
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if format_of(p) and p.is_file())
            if not found:
                raise BigtrainError(f"no {', '.join(FORMATS)} files under {path}")
            files += [_describe(p, text_field) for p in found]
        elif path.is_file():
            files.append(_describe(path, text_field))
        else:
            raise BigtrainError(f"input not found: {path}")
    if not files:
        raise BigtrainError("no input files given")
    return files


def _decode(data: bytes, stats: ReadStats, where: Callable[[], str]) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        stats.invalid_utf8 += 1
        stats.note(where(), f"invalid UTF-8 at byte {e.start} replaced with U+FFFD")
        return data.decode("utf-8", errors="replace")


def _line_base(path: str, start: int) -> int:
    """Number of lines that end before byte `start` (for file:line messages of a byte range)."""
    count, left = 0, start
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                break
            count += chunk.count(b"\n")
            left -= len(chunk)
    return count


def _open_lines(f: InputFile) -> tuple[io.BufferedReader, pa.NativeFile | None]:
    """A line reader over the (decompressed) file, and the raw file whose position is progress."""
    if f.format == "jsonl":
        return open(f.path, "rb"), None
    raw = pa.OSFile(f.path)
    return io.BufferedReader(pa.CompressedInputStream(raw, _CODECS[f.format]), 1 << 20), raw


def _surrogate_free(text: str, line: bytes, where, stats: ReadStats) -> str:
    """`text` with lone surrogates (from JSON escapes such as \\udcff) replaced, and counted."""
    if b"\\ud" not in line and b"\\uD" not in line:
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        stats.invalid_utf8 += 1
        stats.note(where(), "lone surrogate escape replaced")
        return text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def _jsonl_texts(
    f: InputFile, start: int, stop: int, text_field: str, strict: bool, stats: ReadStats
) -> Iterator[tuple[str | None, int]]:
    """(text, input bytes consumed) of each line whose first byte lies in [start, stop).

    Blank lines and skipped records yield None (no document), so that progress still advances.
    """
    lines, raw = _open_lines(f)
    base = 0 if start == 0 else None
    index = 0

    def where() -> str:
        nonlocal base
        if base is None:  # counted only when a message needs it
            base = _line_base(f.path, first)
        return f"{f.path}:{base + index}"

    with lines:
        if start > 0:
            lines.seek(start - 1)
            lines.readline()  # the line holding byte start-1 belongs to the previous range
        first = pos = reported = lines.tell() if raw is None else 0
        while raw is not None or pos < stop:  # a compressed file is always read whole
            try:
                line = lines.readline()
            except (OSError, pa.ArrowException) as e:
                raise BigtrainError(f"{f.path} is not a readable .{f.format} file: {first_line(e)}") from e
            if not line:
                break
            pos += len(line)
            index += 1
            now = pos if raw is None else raw.tell()
            consumed, reported = now - reported, now
            if not line.strip():
                yield None, consumed
                continue
            try:
                record = json.loads(_decode(line, stats, where))
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get(text_field), str):
                yield _surrogate_free(record[text_field], line, where, stats), consumed
                continue
            if record is None:
                what = "not valid JSON"
            elif isinstance(record, dict):
                what = f"no string field '{text_field}'"
            else:
                what = "not a JSON object"
            if strict:
                raise BigtrainError(f"{where()}: {what} (--strict)")
            stats.bad_records += 1
            stats.note(where(), f"{what}; skipped")
            yield None, consumed


def _check_column(table_schema: pa.Schema, path: Path | str, text_field: str) -> None:
    """Check that the table has a string column `text_field`."""
    if text_field not in table_schema.names:
        raise BigtrainError(
            f"{path} has no column '{text_field}' (columns: {', '.join(table_schema.names)}); "
            "pass --text-field"
        )
    kind = table_schema.field(text_field).type
    if kind not in (pa.string(), pa.large_string()):
        raise BigtrainError(f"{path}: column '{text_field}' is {kind}, not a string column")


def _parquet_texts(
    f: InputFile, start: int, stop: int, text_field: str
) -> Iterator[tuple[str, int]]:
    """Texts of row groups [start, stop); null values read as empty documents."""
    try:
        parquet = pq.ParquetFile(f.path)
        rows = sum(f.row_groups) or 1
        for group in range(start, stop):
            share = f.bytes * f.row_groups[group] // rows
            table = parquet.read_row_group(group, columns=[text_field])
            texts = table.column(0).to_pylist()
            for i, text in enumerate(texts):
                yield text or "", share // len(texts) + (i < share % len(texts))
    except (pa.ArrowException, OSError) as e:
        raise BigtrainError(f"{f.path} is not a readable Parquet file: {first_line(e)}") from e


def _open_arrow(path: Path | str) -> pa.Table:
    """An Arrow IPC file (stream format, as HF `datasets` writes, or file format), memory-mapped."""
    try:
        source = pa.memory_map(str(path), "r")
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise BigtrainError(f"{path} is not a readable Arrow file: {first_line(e)}") from e


def _arrow_texts(f: InputFile, text_field: str) -> Iterator[tuple[str, int]]:
    """Texts of an HF `datasets` Arrow file, batch by batch (zero copy until converted)."""
    table = _open_arrow(f.path)
    rows = table.num_rows or 1
    done = 0
    for chunk in table.column(text_field).chunks:
        texts = chunk.to_pylist()
        for i, text in enumerate(texts):
            now = f.bytes * (done + i + 1) // rows
            yield text or "", now - f.bytes * (done + i) // rows
        done += len(texts)


def read_texts(
    f: InputFile, start: int, stop: int, text_field: str, strict: bool, stats: ReadStats
) -> Iterator[tuple[str | None, int]]:
    """(document text, input bytes it accounts for) of one piece of an input file.

    The piece is a byte range for plain .jsonl, a row-group range for .parquet, and the whole file
    otherwise. Blank lines and bad records yield None; bad records are counted in `stats`.
    """
    if f.format == "txt":
        data = Path(f.path).read_bytes()
        yield _decode(data, stats, lambda: f.path), f.bytes
    elif f.format == "parquet":
        yield from _parquet_texts(f, start, stop, text_field)
    elif f.format == "arrow":
        yield from _arrow_texts(f, text_field)
    else:
        yield from _jsonl_texts(f, start, stop, text_field, strict, stats)
