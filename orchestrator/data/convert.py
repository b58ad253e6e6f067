"""Converting CSV to prompt/completion JSONL that passes ``forge data validate``.

The CSV is read as a stream (quoted fields, embedded newlines, a UTF-8 BOM); every problem names
its line and column, and the output appears only when every row converts.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.data.format import fix_completion, fix_prompt
from orchestrator.data.lines import decode_legacy, open_output, read_chunks, refuse_same
from orchestrator.data.report import MAX_REPORTED
from orchestrator.errors import DataError


@dataclass
class ConvertResult:
    out: str
    rows: int  # examples written
    blank: int  # empty CSV rows skipped


class _Lines:
    """Text lines fed to csv.reader, remembering the first line of the record being read."""

    def __init__(self, text: Iterator[str]):
        self.text, self.n = text, 0
        self.first: tuple[int, str] | None = None

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self.text)
        self.n += 1
        if self.first is None:
            self.first = (self.n, line)
        return line


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


def _text_stream(uri: str) -> Iterator[str]:
    """The CSV's text (UTF-8, a BOM dropped); a non-UTF-8 byte is a DataError with line and offset."""
    dec = codecs.getincrementaldecoder("utf-8-sig")()
    line, offset, rest = 1, 0, ""
    for chunk in read_chunks(uri):
        try:
            text = dec.decode(chunk)
        except UnicodeDecodeError as e:
            bad = chunk[e.start : e.start + 1]
            _, name = decode_legacy(chunk[max(0, e.start - 40) : e.start + 40])
            at = line + chunk.count(b"\n", 0, e.start)
            raise DataError(
                f"{uri}:{at}: not UTF-8 (byte 0x{bad.hex()} at "
                f"byte offset {offset + e.start}); it looks like {name}: re-save the CSV as UTF-8"
            ) from None
        offset += len(chunk)
        line += chunk.count(b"\n")
        text, rest = rest + text, ""
        cut = text.rfind("\n") + 1
        text, rest = text[:cut], text[cut:]
        yield from io.StringIO(text, newline="")
    rest += dec.decode(b"", final=True)
    if rest:
        yield rest


def convert_csv(src: str, prompt_column: str, completion_column: str, separator: str | None = None,
                out: str | None = None, delimiter: str = ",") -> ConvertResult:
    """Write ``src`` (CSV: quoted fields, embedded newlines, a UTF-8 BOM) as prompt/completion
    JSONL; all or nothing: any bad row is a DataError naming its line and column."""
    src = storage.normalize(src)
    out = storage.normalize(out or (src[:-4] if src.lower().endswith(".csv") else src) + ".jsonl")
    refuse_same(src, out)
    if not storage.exists(src):
        raise DataError(f"{src}: no such file")
    lines = _Lines(_text_stream(src))
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    problems: list[str] = []
    rows = blank = 0
    header: list[str] | None = None
    with open_output(out) as f:
        try:
            header = next(reader, None)
            if not header:
                raise DataError(f"{src}:1: the CSV is empty: no header row")
            idx = {}
            for col in (prompt_column, completion_column):
                if col not in header:
                    raise DataError(f"{src}:1: no column {col!r} in the header (columns: {', '.join(header)})")
                idx[col] = header.index(col)
            lines.first = None
            for row in reader:
                start = lines.first[0] if lines.first else lines.n
                lines.first = None
                if not row or row == [""]:
                    blank += 1
                    continue
                missing = [c for c in (prompt_column, completion_column) if idx[c] >= len(row)]
                if missing:
                    problems.append(f"{src}:{start}: row has {len(row)} field(s), the header {len(header)}: "
                                    f"column {missing[0]!r} is missing")
                    continue
                prompt, completion = row[idx[prompt_column]], row[idx[completion_column]]
                if not completion.strip():
                    problems.append(f"{src}:{start}: column {completion_column!r} is empty")
                    continue
                obj = {"prompt": fix_prompt(prompt, separator, append=True),
                       "completion": fix_completion(completion)}
                f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
                rows += 1
        except csv.Error as e:
            start, first = lines.first or (lines.n, "")
            col = _open_quote_field(first, delimiter)
            where = f" in column {header[col]!r}" if header and col is not None and col < len(header) else ""
            raise DataError(f"{src}:{start}: unbalanced quote{where} ({e}): the quoted field that starts "
                            f"on line {start} never closes; close it or escape a quote inside as \"\"") from None
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise DataError(f"{len(problems)} problem(s) in the CSV:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)
    return ConvertResult(out, rows, blank)
