"""Writes the corpus files that cannot be kept as text (other encodings, binary), and the 50 MB
single-line file, which tests make into a temp folder instead of the repository.

Run ``python tests/data/make_bad_corpus.py`` to rewrite tests/data/bad/; the output is committed.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

BAD = Path(__file__).resolve().parent / "bad"
TICKETS = [("my card was charged twice", "Billing"), ("the parcel never arrived", "Shipping"),
           ("the app crashes on start", "Technical"), ("I need a refund for order 1234", "Billing"),
           ("the courier left it at the wrong door", "Shipping")]


def line(i: int, text: str | None = None, label: str | None = None) -> str:
    """One valid example line, as UTF-8 text with non-ASCII kept (ensure_ascii=False)."""
    t, lab = TICKETS[i % len(TICKETS)]
    obj = {"prompt": f"Ticket {i}: {text or t}\nCategory:", "completion": f" {label or lab}<|endoftext|>"}
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _with(bad_line: int, text: str, n: int = 10) -> str:
    return "".join(line(i, text if i == bad_line - 1 else None) for i in range(n))


def write_huge_line(path: Path, mb: int = 50) -> Path:
    """One 50 MB line (a valid object with a huge completion) and no newline."""
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"prompt": "Summarize:\\n\\n###\\n\\n", "completion": " ')
        chunk = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]
        for _ in range(mb):
            f.write(chunk)
        f.write('<|endoftext|>"}')
    return path


def main(out: Path = BAD) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # line 3 holds "café au lait" in Latin-1 (é = 0xE9)
    (out / "latin1.jsonl").write_bytes(_with(3, "café au lait spilled on my order").encode("latin-1"))
    # line 2 holds "crème brûlée" in MacRoman (è = 0x8F, û = 0x9E, é = 0x8E)
    (out / "macroman.jsonl").write_bytes(_with(2, "crème brûlée arrived cold").encode("mac_roman"))
    text = "".join(line(i) for i in range(10))
    (out / "utf16le_bom.jsonl").write_bytes(text.encode("utf-16"))  # BOM FF FE, then little-endian
    (out / "utf16le_nobom.jsonl").write_bytes(text.encode("utf-16-le"))
    (out / "utf8_bom.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    # line 4: valid UTF-8 ("naïve") plus one stray byte: no single encoding explains it
    good = _with(4, "naïve question STRAY").encode()
    (out / "corrupt_utf8.jsonl").write_bytes(good.replace(b"STRAY", b"\xff\xfe"))
    (out / "binary.bin").write_bytes(random.Random(0).randbytes(4096))
    # gzip bytes behind a .jsonl name (with .gz, storage decompresses it transparently)
    (out / "compressed.jsonl").write_bytes(gzip.compress(text.encode(), mtime=0))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else BAD)
