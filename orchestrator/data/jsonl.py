"""Reading prompt/completion JSONL, one example per line, with errors that name the line."""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.errors import DataError

MAX_REPORTED = 20


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    line: int  # 1-based line in the source file


def parse_examples(data: bytes, source: str) -> list[Example]:
    """Every example of a JSONL file; raises DataError listing each bad line (file, line, field)."""
    problems: list[str] = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{source}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "the file looks like another encoding (Latin-1, MacRoman, UTF-16): re-save it as UTF-8"
        ) from None
    examples: list[Example] = []
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            problems.append(f"{source}:{n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{source}:{n}: expected an object with prompt and completion, got {type(obj).__name__}")
            continue
        bad = False
        for key in ("prompt", "completion"):
            if key not in obj:
                problems.append(f"{source}:{n}: field '{key}' is missing")
                bad = True
            elif not isinstance(obj[key], str):
                problems.append(f"{source}:{n}: field '{key}' must be a string, got {type(obj[key]).__name__}")
                bad = True
        if not bad:
            examples.append(Example(obj["prompt"], obj["completion"], n))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} problem(s) in the dataset:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)
    if not examples:
        raise DataError(f"{source}: no examples (the file is empty)")
    return examples


def read_examples(uri: str) -> list[Example]:
    if not storage.exists(uri):
        raise DataError(f"{uri}: dataset file not found")
    return parse_examples(storage.read_bytes(uri), uri)
