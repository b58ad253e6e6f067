"""Getting text into the dataset format: reading bytes of any encoding line by line, normalizing
prompts and completions, and converting CSV to JSONL that passes ``forge data validate``.

The readers stream (bounded memory on big files) and keep byte offsets, so every problem can name
its line; ``fix_prompt``/``fix_completion`` are the one definition of the mechanical fixes that
``validate --fix`` and ``convert`` both apply.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from orchestrator import storage
from orchestrator.errors import DataError
from orchestrator.spec import EOT

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # no context holds a 1 MiB example: longer lines are measured, never held
PREFIX = 200  # bytes kept of a line over MAX_LINE
MAX_REPORTED = 20
SEP_MAX = 64  # longest separator looked for
_ENDING = re.compile(r"\s*\S+\s*\Z")  # the last word with the whitespace around it

# --- the format -------------------------------------------------------------------------------


def fix_prompt(prompt: str, separator: str | None = None, append: bool = False) -> str:
    """The prompt without trailing whitespace, keeping a separator that itself ends in newlines
    (``"\\n\\n###\\n\\n"``) and, with ``append``, adding the separator where it is missing."""
    if not prompt or (separator and prompt.endswith(separator)):
        return prompt
    stripped = prompt.rstrip()
    core = separator.rstrip() if separator else ""
    if separator and core and stripped.endswith(core):
        return stripped[: len(stripped) - len(core)] + separator
    if separator and (append or (not core and stripped != prompt)):
        return stripped + separator
    return stripped


def fix_completion(completion: str) -> str:
    """The completion starting with one space and ending with ``<|endoftext|>``."""
    if not completion.startswith(" "):
        completion = " " + completion
    return completion if completion.endswith(EOT) else completion + EOT


def detect_separator(prompts: list[str]) -> tuple[str | None, list[str], float]:
    """(separator, other endings used by >= 5% of prompts, share of prompts ending with it).

    The separator is the longest ending shared by 90% of the prompts, cut to start at its first
    newline or else whitespace (so "charge\\nTeam:" becomes "\\nTeam:"); when prompts split
    between endings (60% "\\nCategory:", 40% "\\nLabel:") the commonest last word wins and the
    others are returned so each prompt using one can be named.
    """
    tails = [p.rstrip(" \t")[-SEP_MAX:] for p in prompts if p]
    n = len(tails)
    if n < 2:
        return None, [], 0.0
    common = ""
    for k in range(1, SEP_MAX + 1):
        suffix, count = Counter(t[-k:] for t in tails).most_common(1)[0]
        if count < 0.9 * n or len(suffix) < k:
            break
        common = suffix
    cut = common.find("\n")
    common = common[cut if cut >= 0 else next((i for i, ch in enumerate(common) if ch.isspace()), 0) :]
    endings = Counter(m.group() for t in tails if (m := _ENDING.search(t[-32:])))
    big = [(e, c) for e, c in endings.most_common() if c >= max(2, 0.05 * n)]
    if big and big[0][1] >= 0.5 * n and len(big[0][0]) > len(common):
        sep = big[0][0]
    elif common:
        sep = common
    elif len(big) >= 2 and sum(c for _, c in big) >= 0.8 * n:
        sep = big[0][0]
    else:
        return None, [], 0.0
    others = [e for e, _ in big if not e.endswith(sep) and not sep.endswith(e)]
    return sep, others, sum(t.endswith(sep) for t in tails) / n


# --- reading bytes ----------------------------------------------------------------------------


class RawLine(NamedTuple):
    data: bytes  # without the newline; only the first PREFIX bytes of a line over MAX_LINE
    offset: int  # byte offset of the line's start in the (decoded-to-UTF-8) stream
    newline: bool  # ended by "\n" (False: the file's last line has none)
    size: int  # the whole line's length in bytes


def read_chunks(uri: str) -> Iterator[bytes]:
    """The file's bytes in chunks, through ``orchestrator.storage`` (local or s3://)."""
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(CHUNK):
            yield chunk


def iter_lines(chunks: Iterable[bytes]) -> Iterator[RawLine]:
    """Lines of a byte stream; of a line over MAX_LINE only its first bytes are kept, so memory
    stays bounded by the chunk size and MAX_LINE whatever the file holds."""
    parts: list[bytes] = []  # kept pieces of the line not yet ended
    size = offset = 0  # that line's size so far and its start
    for chunk in chunks:
        *pieces, last = chunk.split(b"\n")
        for piece in pieces:
            total = size + len(piece)
            data = b"".join([*parts, piece]) if parts and total <= MAX_LINE else (parts or [piece])[0]
            yield RawLine(data if total <= MAX_LINE else data[:PREFIX], offset, True, total)
            offset += total + 1
            parts, size = [], 0
        if last:
            if size + len(last) <= MAX_LINE:
                parts.append(last)
            elif size <= MAX_LINE:
                parts = [b"".join([*parts, last])[:PREFIX]]
            size += len(last)
    if size:
        data = b"".join(parts)
        yield RawLine(data if size <= MAX_LINE else data[:PREFIX], offset, False, size)


_MAGIC = {b"PK\x03\x04": "a ZIP archive (an .xlsx spreadsheet?)", b"\x1f\x8b": "gzip-compressed",
          b"PAR1": "a Parquet file", b"%PDF": "a PDF", b"\x89PNG": "a PNG image"}


def sniff(head: bytes) -> tuple[str, str]:
    """(kind, description) of a file from its first bytes: kind is utf-8, utf-8-sig, utf-16-le,
    utf-16-be or binary."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig", "UTF-8 with a byte-order mark"
    for bom, kind, desc in ((codecs.BOM_UTF16_LE, "utf-16-le", "little"), (codecs.BOM_UTF16_BE, "utf-16-be", "big")):
        if head.startswith(bom):
            return kind, f"UTF-16 ({desc}-endian, byte-order mark {bom.hex(' ').upper()})"
    for magic, desc in _MAGIC.items():
        if head.startswith(magic):
            return "binary", desc
    sample = head[:8192]
    if b"\x00" in sample:
        even, odd = sample[0::2], sample[1::2]
        if odd.count(0) > 0.7 * len(odd) and even.count(0) < 0.1 * len(even):
            return "utf-16-le", "UTF-16 (little-endian, no byte-order mark: every other byte is NUL)"
        if even.count(0) > 0.7 * len(even) and odd.count(0) < 0.1 * len(odd):
            return "utf-16-be", "UTF-16 (big-endian, no byte-order mark: every other byte is NUL)"
        return "binary", f"binary data ({sample.count(0)} NUL bytes in the first {len(sample)})"
    controls = sum(1 for b in sample if b < 32 and b not in (9, 10, 13))
    if controls > 0.01 * len(sample):
        return "binary", f"binary data ({controls} control bytes in the first {len(sample)})"
    return "utf-8", "UTF-8"


def transcode(chunks: Iterable[bytes], encoding: str) -> Iterator[bytes]:
    """UTF-8 chunks from chunks of another encoding (a UTF-16 file, say), decoded incrementally."""
    dec = codecs.getincrementaldecoder(encoding)(errors="replace")
    for chunk in chunks:
        yield dec.decode(chunk).lstrip("\ufeff").encode()
    yield dec.decode(b"", final=True).encode()


_LIKELY = set("àâäáãåçéèêëíìîïñóòôöõúùûüÿœæßø’‘“”–—…«»°€£")
_LEGACY = (("cp1252", "Latin-1 (Windows-1252)"), ("mac_roman", "MacRoman"))


def _plausibility(text: str) -> int:
    """How much the non-ASCII characters look like real text (accents, quotes), not mojibake."""
    score, prev = 0, " "
    for ch in text:
        if ord(ch) > 127:
            if ch in _LIKELY:
                score += 2
            elif ch.isalpha() and ch.isupper() and prev.islower():
                score -= 2  # a capital inside a word: "cafÈ" is Latin-1 read as MacRoman
            else:
                score += 1 if ch.isalpha() else -1
        prev = ch
    return score


def decode_legacy(data: bytes) -> tuple[str | None, str]:
    """(text, encoding name) for a line that is not UTF-8; text is None when the line mixes valid
    UTF-8 with bad bytes (a corrupted file: no single encoding explains it)."""
    loose = data.decode("utf-8", errors="replace")
    if any(ord(c) > 127 and c != "\ufffd" for c in loose):
        return None, "mixed: valid UTF-8 with stray bytes (corrupted, or two encodings in one file)"
    best: tuple[int, str, str] | None = None
    for codec, name in _LEGACY:
        with contextlib.suppress(UnicodeDecodeError):
            text = data.decode(codec)
            score = _plausibility(text)
            if best is None or score > best[0]:
                best = (score, text, name)
    if best is None:
        return data.decode("latin-1"), "an 8-bit encoding (Latin-1?)"
    return best[1], best[2]


@contextlib.contextmanager
def open_output(uri: str) -> Iterator[BinaryIO]:
    """A binary writer for ``uri`` (local or s3://). The file appears only when the block succeeds:
    it is written to a local temp file, then renamed into place or uploaded."""
    uri = storage.normalize(uri)
    local_dir = None if storage.is_s3(uri) else os.path.dirname(uri)
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_dir, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as f:
            yield f
        if local_dir:
            os.replace(tmp, uri)
            return
        fs, path = storage.filesystem(uri)
        with open(tmp, "rb") as src, fs.open_output_stream(path) as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def refuse_same(src: str, out: str) -> None:
    if storage.normalize(out) == storage.normalize(src):
        raise DataError(f"{out}: the output would overwrite the input; choose another path")


# --- CSV to JSONL -----------------------------------------------------------------------------


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
