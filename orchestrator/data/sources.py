"""Where a job's examples come from: JSONL, CSV or Parquet files, local or s3://.

``scan`` checks a file with the validator's rules (whatever its format) and, in the same pass,
indexes it in pieces: byte ranges that start at a record (JSONL, CSV) or row groups (Parquet),
each with its first line. prepare's Ray Data tasks then read any piece (``read_piece``) and still
name every example's 1-based line (the row, for Parquet). ``iter_examples`` streams the examples
from the start (tokenizer training, evaluation). Every read goes through ``orchestrator.storage``.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq

from orchestrator import storage
from orchestrator.data.csvfile import csv_header, csv_records
from orchestrator.data.lines import iter_lines, read_chunks
from orchestrator.data.report import Report
from orchestrator.data.validate import validate_file, validate_records
from orchestrator.errors import DataError

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
MIN_PIECE = 64 << 10  # bytes: pieces are the unit of prepare's shuffle
MAX_PIECES = 1 << 20  # so the index of a huge file stays small (two arrays of 8-byte numbers)
EXACT_SPLIT_MAX = 2_000_000  # examples whose lines are kept for an exact validation split
HASH_WHOLE_MAX = 64 << 20  # local files up to this size are hashed whole for the cache key
PROGRESS_S = 10.0
EXAMPLES = pa.schema([("line", pa.int64()), ("prompt", pa.string()), ("completion", pa.string())])
_JSON_SCHEMA = pa.schema([("prompt", pa.string()), ("completion", pa.string())])
_INK = np.ones(256, dtype=np.int8)
_INK[[9, 10, 13, 32]] = 0  # bytes that are not JSON whitespace


@dataclass(frozen=True)
class Source:
    """One data file and how to read it."""

    uri: str
    format: str  # jsonl | csv | parquet
    prompt_column: str = "prompt"
    completion_column: str = "completion"

    @classmethod
    def of(cls, uri: str, fmt: str = "auto", prompt_column: str = "prompt",
           completion_column: str = "completion") -> Source:
        """The source for ``uri``; ``fmt`` "auto" reads the format from the extension."""
        uri = storage.normalize(uri)
        if fmt == "auto":
            ext = posixpath.splitext(uri.lower())[1]
            if ext not in EXTENSIONS:
                raise DataError(f"{uri}: cannot tell the format from the extension {ext or '(none)'!r}; "
                                "set dataset.format to jsonl, csv or parquet")
            fmt = EXTENSIONS[ext]
        if fmt == "jsonl":
            prompt_column, completion_column = "prompt", "completion"
        return cls(uri, fmt, prompt_column, completion_column)

    @property
    def columns_note(self) -> str:
        if self.format == "jsonl":
            return ""
        return f" (prompt: column {self.prompt_column!r}, completion: column {self.completion_column!r})"


class Piece(NamedTuple):
    """A stretch of a file: bytes [start, end) (JSONL, CSV) or row groups [start, end) (Parquet)."""

    start: int
    end: int
    first_line: int
    size: int  # bytes (for Parquet: the row groups' uncompressed size)


class LineIndex:
    """Told every line's offset and every example's line by the validator; keeps a piece mark
    every ``piece_bytes`` and, up to EXACT_SPLIT_MAX, the examples' lines. With ``log``, says
    how far the check is every PROGRESS_S seconds."""

    def __init__(self, piece_bytes: int, base: int = 0, size: int = 0, log: Callable[[str], Any] | None = None):
        self.piece_bytes, self.base, self.size, self.log = piece_bytes, base, size, log
        self.offsets, self.lines = array("q"), array("q")
        self.example_lines: array | None = array("q")
        self.next_mark = 0
        self.start = self.last = time.time()

    def line(self, n: int, offset: int) -> None:
        if offset >= self.next_mark:
            self.offsets.append(self.base + offset)
            self.lines.append(n)
            self.next_mark = offset + self.piece_bytes
            if self.log is not None and time.time() - self.last >= PROGRESS_S:
                self.last = time.time()
                self.log(f"data: checked {offset / max(self.size, 1):.0%} of {self.size / 1e6:,.1f} MB "
                         f"({offset / 1e6 / (self.last - self.start):,.1f} MB/s), line {n:,}")

    def example(self, n: int) -> None:
        if self.example_lines is not None:
            self.example_lines.append(n)
            if len(self.example_lines) > EXACT_SPLIT_MAX:
                self.example_lines = None

    def pieces(self, end: int) -> list[Piece]:
        bounds = [*self.offsets, end]
        return [Piece(a, b, n, b - a) for a, b, n in zip(bounds, bounds[1:], self.lines, strict=False) if b > a]


@dataclass
class Scan:
    """A checked and indexed file."""

    source: Source
    report: Report
    size: int
    pieces: list[Piece]
    example_lines: array | None  # every example's line (None: too many to keep)
    columns: tuple[int, int] | None = None  # CSV: the two columns' indices
    problems: list[str] = field(default_factory=list)  # structural problems the reader found

    def raise_for_errors(self) -> None:
        """DataError listing every error with file, line, code and message."""
        errors = [p for p in self.report.problems if p.severity == "error"]
        if not self.problems and not errors:
            return
        unit = {"parquet": "row", "csv": "line"}.get(self.source.format, "line")
        listed = self.problems + [f"{self.source.uri}:{p.line or '-'}: {p.code}: {p.message}" for p in errors]
        total = len(self.problems) + self.report.errors
        more = f"\n  ... and {total - 20} more" if total > 20 else ""
        how = (f"forge data validate {self.source.uri} explains each" if self.source.format == "jsonl"
               else f"numbers after the file name are the {unit}s{self.source.columns_note}")
        raise DataError(f"{total} error(s) in the dataset ({how}):\n  " + "\n  ".join(listed[:20]) + more)


def file_size(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: dataset file not found")
    return int(info.size)


def fingerprint(uri: str) -> dict[str, Any]:
    """What identifies the file's content for the cache key: its bytes' sha256 (local files up to
    HASH_WHOLE_MAX), else path, size and modification time."""
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: dataset file not found")
    out: dict[str, Any] = {"uri": uri, "bytes": int(info.size)}
    if not storage.is_s3(uri) and info.size <= HASH_WHOLE_MAX:
        h = hashlib.sha256()
        for chunk in read_chunks(uri):
            h.update(chunk)
        out["sha256"] = h.hexdigest()
    else:
        out["mtime_ns"] = info.mtime_ns
    return out


def piece_bytes(size: int) -> int:
    return max(MIN_PIECE, -(-size // MAX_PIECES))


def scan(source: Source, log: Callable[[str], Any] | None = None) -> Scan:
    """Validate ``source`` and index it in pieces (one streaming pass; progress lines to ``log``)."""
    size = file_size(source.uri)
    if source.format == "parquet":
        return _scan_parquet(source, size)
    if source.format == "csv":
        return _scan_csv(source, size, log)
    fs, path = storage.filesystem(source.uri)
    with fs.open_input_stream(path) as f:
        bom = f.read(3) == b"\xef\xbb\xbf"
    index = LineIndex(piece_bytes(size), 3 if bom else 0, size, log)
    report = validate_file(source.uri, index=index)
    return Scan(source, report, size, index.pieces(size), index.example_lines)


def _scan_csv(source: Source, size: int, log: Callable[[str], Any] | None) -> Scan:
    header, columns = csv_header(source.uri, source.prompt_column, source.completion_column)
    index, problems = LineIndex(piece_bytes(size), 0, size, log), []

    def records() -> Iterator[tuple[int, str, str]]:
        for r in csv_records(source.uri, columns, header=header, problems=problems):
            index.line(r.line, r.offset)
            yield r.line, r.prompt, r.completion

    report = validate_records(source.uri, size, records(), index)
    return Scan(source, report, size, index.pieces(size), index.example_lines, columns, problems)


def _parquet_file(uri: str) -> pq.ParquetFile:
    fs, path = storage.filesystem(uri)
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{uri}: not a readable Parquet file ({e})") from None


def _parquet_columns(source: Source, pf: pq.ParquetFile) -> list[str]:
    schema = pf.schema_arrow
    cols = [source.prompt_column, source.completion_column]
    for col in cols:
        if col not in schema.names:
            raise DataError(f"{source.uri}: no column {col!r} (columns: {', '.join(schema.names)}); "
                            "set dataset.prompt_column and dataset.completion_column")
        kind = schema.field(col).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise DataError(f"{source.uri}: column {col!r} holds {kind}, not text; store prompts and "
                            "completions as strings")
    return cols


def _parquet_rows(source: Source, pf: pq.ParquetFile, groups: range) -> Iterator[tuple[int, Any, Any]]:
    cols = _parquet_columns(source, pf)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(groups.start)) + 1
    for g in groups:
        for batch in pf.iter_batches(row_groups=[g], columns=cols):
            for p, c in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                yield row, p, c
                row += 1


def _scan_parquet(source: Source, size: int) -> Scan:
    pf = _parquet_file(source.uri)
    meta = pf.metadata
    index = LineIndex(1)
    pieces, row = [], 1
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n:
            pieces.append(Piece(g, g + 1, row, int(meta.row_group(g).total_byte_size)))
        row += n
    report = validate_records(source.uri, size, _parquet_rows(source, pf, range(meta.num_row_groups)), index)
    return Scan(source, report, size, pieces, index.example_lines)


class Example(NamedTuple):
    line: int  # 1-based line (the row, for Parquet)
    prompt: str
    completion: str


def _jsonl_examples(lines: Iterator[Any], first_line: int, uri: str) -> Iterator[Example]:
    """The examples of JSONL lines (``RawLine``s numbered from ``first_line``), blank lines skipped
    as the validator skips them."""
    for n, raw in enumerate(lines, first_line):
        data = raw.data.removeprefix(b"\xef\xbb\xbf") if raw.offset == 0 else raw.data
        try:
            text = data.decode()
            if not text or text.isspace():
                continue
            obj = json.loads(text)
            example = Example(n, obj["prompt"], obj["completion"])
            if "\\ud" in text.lower():  # a lone surrogate escape is no text for a tokenizer
                (example.prompt + example.completion).encode()
            yield example
        except (ValueError, KeyError, TypeError):  # UnicodeError is a ValueError
            raise DataError(f"{uri}:{n}: not a prompt/completion object (the file changed after it was "
                            "checked?)") from None


def read_piece_table(source: Source, piece: Piece, columns: tuple[int, int] | None = None,
                     f: Any = None) -> pa.Table:
    """The examples of one piece of a checked file as a table of line, prompt and completion
    (``f``: an open random-access file to reuse)."""
    fs, path = storage.filesystem(source.uri)
    f = f or fs.open_input_file(path)
    if source.format == "parquet":
        pf = pq.ParquetFile(f)
        t = pf.read_row_groups(list(range(piece.start, piece.end)), columns=_parquet_columns(source, pf))
        lines = np.arange(piece.first_line, piece.first_line + t.num_rows, dtype=np.int64)
        return pa.table([lines, *(c.cast(pa.string()) for c in t.columns)], schema=EXAMPLES)
    data = f.read_at(piece.end - piece.start, piece.start)
    if source.format == "jsonl":
        table = _jsonl_table(data, piece.first_line)
        if table is not None:
            return table
        examples = list(_jsonl_examples(iter_lines([data]), piece.first_line, source.uri))
    else:
        assert columns is not None
        records = csv_records(source.uri, columns, [data], piece.first_line, piece.start)
        examples = [Example(r.line, r.prompt, r.completion) for r in records]
    return pa.table([pa.array([e.line for e in examples], pa.int64()), pa.array([e.prompt for e in examples], pa.string()),
                     pa.array([e.completion for e in examples], pa.string())], schema=EXAMPLES)


def _jsonl_table(data: bytes, first_line: int) -> pa.Table | None:
    """pyarrow's JSON reader on a piece, each row's line found from the bytes (blank lines, which
    it skips, hold only whitespace); None when it cannot say (say, a line of Unicode spaces)."""
    arr = np.frombuffer(data, np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(arr)]])
    ink = np.concatenate([[0], np.cumsum(_INK[arr], dtype=np.int64)])
    filled = np.flatnonzero(ink[ends] - ink[starts] > 0)
    try:
        t = pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(use_threads=False, block_size=len(data) + 1),
                             parse_options=pajson.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"))
    except pa.ArrowInvalid:
        return None
    if t.num_rows != len(filled) or t.column("prompt").null_count or t.column("completion").null_count:
        return None
    lines = (first_line + filled).astype(np.int64)
    return pa.table([lines, t.column("prompt"), t.column("completion")], schema=EXAMPLES)


def read_piece(source: Source, piece: Piece, columns: tuple[int, int] | None = None,
               f: Any = None) -> list[Example]:
    """The examples of one piece of a checked file (see ``read_piece_table``)."""
    t = read_piece_table(source, piece, columns, f)
    return [Example(*r) for r in zip(*(t.column(i).to_pylist() for i in range(3)), strict=True)]


def iter_examples(source: Source) -> Iterator[Example]:
    """Every example from the start of the file, streaming; a file with errors (or none at all)
    is a DataError listing them, from a full check, so the user sees every problem at once."""
    file_size(source.uri)
    seen = False
    try:
        for e in _examples(source):
            if not (isinstance(e.prompt, str) and isinstance(e.completion, str)):
                raise DataError(f"{source.uri}:{e.line}: not text")
            seen = True
            yield e
    except DataError:
        scan(source).raise_for_errors()
        raise
    if not seen:
        scan(source).raise_for_errors()
        raise DataError(f"{source.uri}: no examples in the file")


def _examples(source: Source) -> Iterator[Example]:
    if source.format == "parquet":
        pf = _parquet_file(source.uri)
        for n, p, c in _parquet_rows(source, pf, range(pf.metadata.num_row_groups)):
            yield Example(n, p, c)
    elif source.format == "csv":
        _, columns = csv_header(source.uri, source.prompt_column, source.completion_column)
        for r in csv_records(source.uri, columns):
            yield Example(r.line, r.prompt, r.completion)
    else:
        yield from _jsonl_examples(iter_lines(read_chunks(source.uri)), 1, source.uri)
