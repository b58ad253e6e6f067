"""Dataset bytes in and out, streaming: reading a file line by line in any encoding (sniffing
UTF-8, UTF-16 or binary; guessing a legacy 8-bit encoding per line) and writing outputs whole.

The readers keep memory bounded on big files and keep byte offsets, so every problem can name its
line.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO, NamedTuple

from orchestrator import storage
from orchestrator.errors import DataError

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # no context holds a 1 MiB example: longer lines are measured, never held
PREFIX = 200  # bytes kept of a line over MAX_LINE


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
