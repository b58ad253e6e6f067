"""Reading CSV prompt/completion pairs as a stream, for ``convert`` and ``prepare`` alike.

Quoted fields, embedded newlines and a UTF-8 BOM are fine. The file is read line by line in
bytes (``lines.iter_lines``), so every record knows its first line and byte offset: a problem
names them, and prepare can later read any stretch of the file from a record's offset.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from orchestrator.data.lines import MAX_LINE, decode_legacy, iter_lines, read_chunks
from orchestrator.errors import DataError


class CsvRecord(NamedTuple):
    line: int  # 1-based line where the record starts
    offset: int  # byte offset of that line in the file
    prompt: str
    completion: str


def _open_quote_field(line: str, delimiter: str) -> int | None:
    """Index of the field whose opening quote is not closed on ``line``."""
    col, quoted, start = 0, False, True
    i = 0
    while i < len(line):
        ch = line[i]
        if quoted:
            if ch == '"' and line[i + 1 : i + 2] == '"':
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"' and start:
            quoted = True
        elif ch == delimiter:
            col += 1
        start = ch == delimiter
        i += 1
    return col if quoted else None


class _Lines:
    """Decoded lines (with their newline) fed to csv.reader, remembering where the record being
    read started; a line that is not UTF-8 is a DataError naming the line and byte offset."""

    def __init__(self, uri: str, chunks: Iterable[bytes], first_line: int, base_offset: int):
        self.uri, self.raw = uri, iter_lines(chunks)
        self.n, self.base = first_line - 1, base_offset
        self.first: tuple[int, int, str] | None = None  # (line, offset, text) of the record's start

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        raw = next(self.raw)
        self.n += 1
        offset = self.base + raw.offset
        if raw.size > MAX_LINE:
            raise DataError(f"{self.uri}:{self.n}: line is {raw.size / 1e6:.1f} MB; no model's context holds "
                            "an example this long: remove it or split its text into smaller examples")
        data = raw.data.removeprefix(b"\xef\xbb\xbf") if offset == 0 else raw.data
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            _, name = decode_legacy(data)
            raise DataError(f"{self.uri}:{self.n}: not UTF-8 (byte 0x{data[e.start]:02x} at byte offset "
                            f"{offset + e.start + len(raw.data) - len(data)}); it looks like {name}: "
                            "re-save the CSV as UTF-8") from None
        if self.first is None:
            self.first = (self.n, offset, text)
        return text + "\n" if raw.newline else text


def csv_records(uri: str, columns: tuple[int, int], chunks: Iterable[bytes] | None = None,
                first_line: int = 1, base_offset: int = 0, delimiter: str = ",",
                header: list[str] | None = None, problems: list[str] | None = None,
                blank: list[int] | None = None) -> Iterator[CsvRecord]:
    """The (prompt, completion) records of ``chunks`` (default: the whole file after its header),
    taking fields ``columns``; blank rows are skipped (their lines added to ``blank``), a short
    row is added to ``problems`` (or raised when None), an unbalanced quote is a DataError naming
    its line and column."""
    lines = _Lines(uri, read_chunks(uri) if chunks is None else chunks, first_line, base_offset)
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    if chunks is None:  # the whole file: skip its header
        lines.first = None
        _read_row(reader, lines, header, delimiter)
    need = max(columns)
    while True:
        lines.first = None
        row = _read_row(reader, lines, header, delimiter)
        if row is None:
            return
        line, offset, _ = lines.first or (lines.n, 0, "")
        if not row or row == [""]:
            if blank is not None:
                blank.append(line)
            continue
        if len(row) <= need:
            missing = header[need] if header and need < len(header) else f"#{need + 1}"
            msg = (f"{uri}:{line}: row has {len(row)} field(s), the header {len(header or row)}: "
                   f"column {missing!r} is missing")
            if problems is None:
                raise DataError(msg)
            problems.append(msg)
            continue
        yield CsvRecord(line, offset, row[columns[0]], row[columns[1]])


def _read_row(reader, lines: _Lines, header: list[str] | None, delimiter: str) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as e:
        start, _, first = lines.first or (lines.n, 0, "")
        col = _open_quote_field(first, delimiter)
        where = f" in column {header[col]!r}" if header and col is not None and col < len(header) else ""
        raise DataError(f"{lines.uri}:{start}: unbalanced quote{where} ({e}): the quoted field that starts "
                        f"on line {start} never closes; close it or escape a quote inside as \"\"") from None


def csv_header(uri: str, prompt_column: str, completion_column: str,
               delimiter: str = ",") -> tuple[list[str], tuple[int, int]]:
    """The header row and the indices of the two columns; a DataError names a missing one."""
    lines = _Lines(uri, read_chunks(uri), 1, 0)
    header = _read_row(csv.reader(lines, delimiter=delimiter, strict=True), lines, None, delimiter)
    if not header or header == [""]:
        raise DataError(f"{uri}:1: the CSV is empty: no header row")
    idx = []
    for col in (prompt_column, completion_column):
        if col not in header:
            raise DataError(f"{uri}:1: no column {col!r} in the header (columns: {', '.join(header)})")
        idx.append(header.index(col))
    return header, (idx[0], idx[1])
