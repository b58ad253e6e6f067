"""Converting CSV to prompt/completion JSONL that passes ``forge data validate``.

The CSV is read as a stream (quoted fields, embedded newlines, a UTF-8 BOM); every problem names
its line and column, and the output appears only when every row converts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.data.csvfile import csv_header, csv_records
from orchestrator.data.format import fix_completion, fix_prompt
from orchestrator.data.lines import open_output, refuse_same
from orchestrator.data.report import MAX_REPORTED
from orchestrator.errors import DataError


@dataclass
class ConvertResult:
    out: str
    rows: int  # examples written
    blank: int  # empty CSV rows skipped


def convert_csv(src: str, prompt_column: str, completion_column: str, separator: str | None = None,
                out: str | None = None, delimiter: str = ",") -> ConvertResult:
    """Write ``src`` (CSV: quoted fields, embedded newlines, a UTF-8 BOM) as prompt/completion
    JSONL; all or nothing: any bad row is a DataError naming its line and column."""
    src = storage.normalize(src)
    out = storage.normalize(out or (src[:-4] if src.lower().endswith(".csv") else src) + ".jsonl")
    refuse_same(src, out)
    if not storage.exists(src):
        raise DataError(f"{src}: no such file")
    header, columns = csv_header(src, prompt_column, completion_column, delimiter)
    problems: list[str] = []
    blank: list[int] = []
    rows = 0
    with open_output(out) as f:
        for r in csv_records(src, columns, delimiter=delimiter, header=header, problems=problems,
                             blank=blank):
            if not r.completion.strip():
                problems.append(f"{src}:{r.line}: column {completion_column!r} is empty")
                continue
            obj = {"prompt": fix_prompt(r.prompt, separator, append=True),
                   "completion": fix_completion(r.completion)}
            f.write((json.dumps(obj, ensure_ascii=False) + "\n").encode())
            rows += 1
        if problems:
            more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
            raise DataError(f"{len(problems)} problem(s) in the CSV:\n  " + "\n  ".join(problems[:MAX_REPORTED]) + more)
    return ConvertResult(out, rows, len(blank))
