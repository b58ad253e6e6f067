"""What ``forge data validate`` finds: the stable problem codes and the report types.

A problem names its 1-based line (None: the whole file), its field, a code from ``CODES``, a
message and a fix hint; tools match the codes, so they never change meaning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.errors import DataError

# code: (severity, meaning). Errors break the file or a rule of the format (the model would learn
# or stop wrongly); warnings are advice and training works. Codes are stable: tools match them.
CODES: dict[str, tuple[str, str]] = {
    "empty-file": ("error", "the file has no bytes"),
    "binary-file": ("error", "not text: a binary, compressed or spreadsheet file"),
    "not-utf8": ("error", "bytes that are not UTF-8 (Latin-1, MacRoman, UTF-16)"),
    "utf8-bom": ("warning", "a UTF-8 byte-order mark before the first line"),
    "blank-line": ("warning", "an empty line"),
    "invalid-json": ("error", "a line that is not JSON"),
    "truncated-line": ("error", "the last line is cut off: no newline and incomplete JSON"),
    "json-array": ("error", "the file is a JSON array, not one object per line"),
    "not-object": ("error", "a line that is JSON but not an object"),
    "missing-key": ("error", "no prompt or no completion key"),
    "extra-key": ("warning", "keys besides prompt and completion (training ignores them)"),
    "not-string": ("error", "a prompt or completion that is a number, null, list or object"),
    "line-too-long": ("error", "a line over 1 MiB: no model's context holds it (not read further)"),
    "prompt-trailing-whitespace": ("error", "a prompt ending in whitespace"),
    "completion-leading-space": ("error", "a completion not starting with a space"),
    "completion-missing-eot": ("error", "a completion not ending with <|endoftext|>"),
    "empty-completion": ("error", "a completion with no text"),
    "eot-inside": ("error", "<|endoftext|> inside a prompt or before a completion's end"),
    "no-separator": ("error", "prompts share no fixed ending to act as the separator"),
    "separator-missing": ("error", "a prompt not ending with the separator"),
    "separator-inconsistent": ("error", "a prompt ending with another separator than most"),
    "separator-in-prompt": ("error", "the separator also appears inside a prompt"),
    "too-long": ("error", "prompt + completion over the model's context (with --model)"),
    "no-examples": ("error", "no usable example in the file"),
    "duplicate": ("warning", "the same prompt and completion as an earlier line"),
    "conflict": ("warning", "an earlier line's prompt with a different completion"),
    "few-examples": ("warning", "fewer examples than the task needs"),
    "few-per-class": ("warning", "a class with fewer than ~25 examples"),
    "class-many-tokens": ("warning", "a class label of several tokens (with --model)"),
}
MAX_KEPT = 100  # problems kept per code; all are counted
MAX_REPORTED = 20  # problems named in one DataError


@dataclass
class Problem:
    line: int | None  # 1-based; None: the whole file
    field: str | None  # prompt, completion, another key; None: the whole line
    code: str
    message: str
    fix: str
    severity: str = "error"
    fixable: bool = False  # --fix repairs it


@dataclass
class FixResult:
    out: str | None  # None: nothing was written (no example survived)
    written: int
    changes: dict[str, int]  # code -> lines changed, or dropped (blank lines, duplicates)
    left_out: list[int]  # lines with problems --fix cannot repair (the first MAX_KEPT)
    left_out_count: int


@dataclass
class Report:
    source: str
    problems: list[Problem]  # by line; at most MAX_KEPT per code
    counts: dict[str, int]  # every problem found, per code
    summary: dict[str, Any]
    fix: FixResult | None = None
    unfixable_errors: int = 0  # errors --fix cannot repair

    @property
    def errors(self) -> int:
        return sum(n for c, n in self.counts.items() if CODES[c][0] == "error")

    @property
    def warnings(self) -> int:
        return sum(n for c, n in self.counts.items() if CODES[c][0] == "warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def raise_for_errors(self, limit: int = 20) -> None:
        """DataError listing the errors as file:line: code: message (for prepare, before tokenizing)."""
        if self.ok:
            return
        errors = [p for p in self.problems if p.severity == "error"]
        lines = [f"{self.source}:{p.line or '-'}: {p.code}: {p.message}" for p in errors[:limit]]
        more = f"\n  ... and {self.errors - len(lines)} more" if self.errors > len(lines) else ""
        raise DataError(f"{self.errors} error(s) in the dataset (forge data validate {self.source} "
                        "explains each):\n  " + "\n  ".join(lines) + more)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "ok": self.ok, "errors": self.errors, "warnings": self.warnings,
                "counts": self.counts, "problems": [asdict(p) for p in self.problems],
                "summary": self.summary, "fix": asdict(self.fix) if self.fix else None}
