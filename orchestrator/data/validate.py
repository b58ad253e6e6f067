"""Checking prompt/completion JSONL against the hosted workflow's rules, in one streaming pass.

``validate_file(uri) -> Report`` reads the file in binary, line by line, so a bad byte is reported
with its line and byte offset; it keeps hashes, counts and a bounded sample, never the whole file.
Every problem has a 1-based line (None: the whole file), a field, a stable code from ``CODES``, a
message and a fix hint. With ``fix_out`` it also writes a mechanically corrected copy.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import pyarrow.fs as pafs

from orchestrator import storage
from orchestrator.data.lines import (
    MAX_LINE,
    RawLine,
    decode_legacy,
    iter_lines,
    open_output,
    read_chunks,
    refuse_same,
    sniff,
    transcode,
)
from orchestrator.data.records import Record, RecordChecks
from orchestrator.data.report import CODES, MAX_KEPT, FixResult, Problem, Report
from orchestrator.data.split import is_classification
from orchestrator.errors import DataError
from orchestrator.spec import recommended_epochs

KEYS = ("prompt", "completion")
SAMPLE, SAMPLE_BYTES = 2000, 8 << 20  # records held back while the separator is detected
BATCH = 512
CLASS_MIN, CLASS_TOKENS, CONDITIONAL_MIN, OPEN_ENDED_MIN = 25, 3, 200, 500
_scan = json.JSONDecoder().scan_once  # json.loads without its per-call Python overhead
SHAPE = 'one JSON object per line: {"prompt": "...", "completion": " ...<|endoftext|>"}'


def _json_type(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    return {str: "a string", list: "an array"}.get(type(v), "an object")


class _Validator(RecordChecks):
    """One pass over one file: line problems at once, record problems once the separator is known."""

    def __init__(self, source: str, size: int, tokenizer: Any, context: int | None, fix_out: str | None):
        self.source, self.size, self.tok, self.context, self.fix_out = source, size, tokenizer, context, fix_out
        self.out: Any = None  # the fixed copy's writer while --fix runs
        self.problems: list[Problem] = []
        self.counts: Counter[str] = Counter()
        self.changes: Counter[str] = Counter()
        self.left_out: list[int] = []
        self.unfixable = self.left_out_count = self.written = self.lines = self.examples = 0
        self.checked = self.empty_prompts = self.duplicates = self.conflicts = self.max_len = 0
        self.measured = self.sampled = 0  # examples seen by / measured in _token_lengths
        self.last_left: int | None = None
        self.pending: list[Record] = []
        self.pending_bytes = 0
        self.sep: str | None = None
        self.sep_others: list[str] = []
        self.sep_share, self.sep_decided = 0.0, False
        self.firsts: dict[int, int] = {}  # prompt hash -> completion hash << 32 | first line
        self.pairs: dict[int, int] = {}  # (prompt, completion) hash -> line, for prompts with 2+ completions
        self.labels: Counter[str] | None = Counter()
        self.lengths: list[int] = []
        self.rng = random.Random(0)
        self.array_line: int | None = None
        self.array_bad = 0
        self.started = False
        self.encoding = "UTF-8"
        self.legacy: Counter[str] = Counter()  # lines read in another encoding, by its name
        self.index: Any = None  # prepare's LineIndex: told each line's offset and each example's line

    def add(self, line: int | None, code: str, message: str, fix: str, field: str | None = None,
            fixable: bool = False) -> None:
        severity = CODES[code][0]
        self.counts[code] += 1
        if severity == "error" and not fixable:
            self.unfixable += 1
            if line is not None:
                self._leave_out(line)
        if self.counts[code] <= MAX_KEPT:
            self.problems.append(Problem(line, field, code, message, fix, severity, fixable))

    def _leave_out(self, line: int) -> None:
        if line != self.last_left:
            self.last_left = line
            self.left_out_count += 1
            if len(self.left_out) < MAX_KEPT:
                self.left_out.append(line)

    def run(self, chunks: Iterator[bytes]) -> None:
        head = next(chunks, b"")
        kind, self.encoding = sniff(head)
        if not head or head == b"\xef\xbb\xbf":
            return self.add(None, "empty-file", "the file is empty", f"write {SHAPE}")
        if kind == "binary":
            return self.add(None, "binary-file", f"the file is {self.encoding}, not JSON Lines text",
                            "export the data as UTF-8 JSONL; from a spreadsheet, save as CSV and run "
                            "forge data convert")
        rest = itertools.chain([head], chunks)
        if kind == "utf-8-sig":
            self.add(1, "utf8-bom", "the file starts with a UTF-8 byte-order mark (EF BB BF)",
                     "save it as UTF-8 without BOM (--fix strips it)", fixable=True)
            rest = itertools.chain([head[3:]], chunks)
        elif kind.startswith("utf-16"):
            self.add(1, "not-utf8", f"not UTF-8: the file is {self.encoding} (byte offset 0, line 1)",
                     "re-save it as UTF-8 (--fix writes a UTF-8 copy)", fixable=True)
            rest = transcode(rest, kind)
        if self.out is not None and kind != "utf-8":
            self.changes["utf8-bom" if kind == "utf-8-sig" else "not-utf8"] += 1
        for raw in iter_lines(rest):
            self.feed(raw)
        self.finish()

    def feed(self, raw: RawLine) -> None:
        self.lines += 1
        n = self.lines
        if self.index is not None:
            self.index.line(n, raw.offset)
        if raw.size > MAX_LINE:
            return self.add(n, "line-too-long", f"line is {raw.size / 1e6:.1f} MB; no model's context "
                            "holds an example this long (the line is not read further)", "remove the line "
                            "or split its text into examples that fit the context (2048 tokens for GPT-NeoX)")
        data = raw.data[:-1] if raw.data.endswith(b"\r") else raw.data
        legacy = None
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            decoded, name = decode_legacy(data)
            where = (f"not UTF-8: {e.reason} 0x{data[e.start]:02x} at byte offset {raw.offset + e.start}"
                     f" (line {n}, column {e.start + 1})")
            if decoded is None:
                return self.add(n, "not-utf8", f"{where}; {name}", "retype the damaged characters or "
                                "re-export the file as UTF-8")
            text, legacy = decoded, (where, name, e.start)
            self.legacy[name] += 1
        if not text or text.isspace():
            if self.out is not None:
                self.changes["blank-line"] += 1
            return self.add(n, "blank-line", "blank line", "remove it (--fix drops blank lines)", fixable=True)
        if not self.started:
            self.started = True
            self.array_line = n if text.lstrip().startswith("[") else None
        objs = self._parse(n, text, raw.newline) or []
        if legacy:
            where, name, at = legacy
            fld = next((k for o in objs for k in KEYS if isinstance(o.get(k), str) and text[at] in o[k]), None)
            self.add(n, "not-utf8", f"{where}; it looks like {name}: {text[max(0, at - 20) : at + 20]!r}",
                     f"re-save the file as UTF-8 (--fix re-encodes the line from {name})", fld, True)
        for obj in objs:
            self._object(n, obj, text, legacy is not None)

    def _parse(self, n: int, text: str, newline: bool) -> list[dict] | None:
        try:
            obj, end = _scan(text, 0)
            if end != len(text):
                raise StopIteration
        except (StopIteration, json.JSONDecodeError):
            obj = None  # json.loads below says why, or accepts surrounding whitespace
        try:
            obj = json.loads(text) if obj is None else obj
        except json.JSONDecodeError as e:
            if self.array_line is not None:  # an array with one element per line: "  {...},"
                s = text.strip().removeprefix("[").removesuffix("]").strip().removesuffix(",")
                try:
                    obj = json.loads(s) if s else None
                except json.JSONDecodeError:
                    obj = None
                if s and not isinstance(obj, dict):
                    self.array_bad += 1
                    self._leave_out(n)
                return [obj] if isinstance(obj, dict) else []
            if not newline:
                return self.add(n, "truncated-line", "the last line ends without a newline and is not "
                                f"complete JSON ({e.msg.lower()} at column {e.colno}): the file looks cut "
                                "off", "copy or download the file again; if the line is the real end, complete it")
            hint = " (single quotes: a Python dict, not JSON)" if text.lstrip().startswith("{'") else ""
            return self.add(n, "invalid-json", f"invalid JSON: {e.msg.lower()} at column {e.colno}{hint}",
                            f'write {SHAPE}, with double quotes; escape a " inside text as \\"')
        if isinstance(obj, dict):
            return [obj]
        if isinstance(obj, list) and n == self.array_line:
            self.array_bad += sum(not isinstance(o, dict) for o in obj)
            return [o for o in obj if isinstance(o, dict)]
        return self.add(n, "not-object", f"the line holds {_json_type(obj)}, not an object", f"write {SHAPE}")

    def _object(self, n: int, obj: dict, text: str, legacy: bool) -> None:
        fixes = ["not-utf8"] if legacy else []
        rewrite = legacy or self.array_line is not None  # the line cannot be copied as it is
        if len(obj) != 2 or type(obj.get("prompt")) is not str or type(obj.get("completion")) is not str:
            if not self._keys(n, obj):
                return
            rewrite, fixes = True, fixes + ["extra-key"]
        if ("\\ud" in text or "\\uD" in text) and not self._whole_characters(n, obj):
            return
        self.examples += 1
        if self.index is not None:
            self.index.example(n)
        self.pending.append(Record(n, obj, text, rewrite, fixes))
        self.pending_bytes += len(text) or len(obj["prompt"]) + len(obj["completion"])
        if not self.sep_decided and (len(self.pending) >= SAMPLE or self.pending_bytes >= SAMPLE_BYTES):
            self._decide()
        if self.sep_decided and len(self.pending) >= BATCH:
            self._flush()

    def _whole_characters(self, n: int, obj: dict) -> bool:
        """False (and a problem) when a \\uD800-\\uDFFF escape stands alone: half of a UTF-16
        pair is no character, and no tokenizer takes it."""
        for k in KEYS:
            bad = next((c for c in obj[k] if "\ud800" <= c <= "\udfff"), None)
            if bad is not None:
                self.add(n, "invalid-json", f"{k} holds the escape \\u{ord(bad):04x}, half of a UTF-16 "
                         "surrogate pair: not a character", "write the character itself (UTF-8), or its "
                         "whole pair of escapes", k)
                return False
        return True

    def feed_record(self, n: int, prompt: Any, completion: Any) -> None:
        """One row of a CSV or Parquet file (``n``: its line or row): the same record rules as a
        JSONL line; the reader has already checked the file's structure and encoding."""
        self.lines = n
        self._object(n, {"prompt": prompt, "completion": completion}, "", False)

    def _keys(self, n: int, obj: dict) -> bool:
        """Report missing, extra and non-string keys; True when the line is still an example."""
        usable = True
        for k in KEYS:
            if k not in obj:
                hint = ' (use "prompt": "" for open-ended generation)' if k == "prompt" else ""
                self.add(n, "missing-key", f"no {k!r} key (keys: {', '.join(map(repr, obj)) or 'none'})",
                         f"give every line both prompt and completion{hint}", k)
                usable = False
            elif not isinstance(obj[k], str):
                self.add(n, "not-string", f"{k} is {_json_type(obj[k])}, not a string",
                         f'quote it as text: "{k}": "..."', k)
                usable = False
        extra = [k for k in obj if k not in KEYS]
        if extra:
            self.add(n, "extra-key", f"extra key(s) {', '.join(map(repr, extra))}: only prompt and "
                     "completion are read", "remove them (--fix drops them)", extra[0], True)
        return usable

    def finish(self) -> None:
        if not self.sep_decided:
            self._decide()
        self._flush()
        if self.array_line is not None:
            bad = f"; {self.array_bad} line(s) are not one object each" if self.array_bad else ""
            self.add(self.array_line, "json-array", f"the file is a JSON array of objects, not JSON Lines "
                     f"(one object per line){bad}", "write one object per line (--fix does it when each "
                     "object is on its own line; else: jq -c '.[]' FILE > OUT.jsonl)", None, not self.array_bad)
            if self.out is not None and not self.array_bad:
                self.changes["json-array"] += 1
        if not self.examples:
            why = " (all blank)" if self.counts["blank-line"] == self.lines else ""
            return self.add(None, "no-examples", f"no usable example in {self.lines} line(s){why}", f"write {SHAPE}")
        task, n = self.task(), self.examples
        need = {"open-ended": OPEN_ENDED_MIN, "conditional-generation": CONDITIONAL_MIN}.get(task, 0)
        if n < need:
            self.add(None, "few-examples", f"{n} examples for {task}; at least ~{need} are recommended",
                     "add more examples: quality grows with every doubling of the data")
        for label, count in self.labels.most_common() if task == "classification" else []:
            if count < CLASS_MIN:
                self.add(None, "few-per-class", f"class {label!r} has {count} example(s); at least "
                         f"~{CLASS_MIN} per class are recommended", "add examples of this class, or merge "
                         "rare classes", "completion")
            k = len(self.tok(" " + label, add_special_tokens=False)["input_ids"]) if self.tok else 0
            if k > CLASS_TOKENS:
                self.add(None, "class-many-tokens", f"class {label!r} is {k} tokens; classes of one token "
                         "each are learned and scored more reliably", "use short one-word labels (e.g. "
                         "' positive', ' 1') and map them back after inference", "completion")

    def task(self) -> str | None:
        if not self.examples:
            return None
        if 2 * self.empty_prompts > self.checked:
            return "open-ended"
        classes = len(self.labels) if self.labels is not None else 0
        return "classification" if is_classification(classes, self.checked) else "conditional-generation"

    def report(self) -> Report:
        lengths = sorted(self.lengths)

        def pct(q: float) -> int:
            return lengths[min(len(lengths) - 1, int(q * len(lengths)))] if lengths else 0

        task = self.task()
        summary: dict[str, Any] = {
            "file": self.source, "bytes": self.size, "lines": self.lines,
            "encoding": self.encoding + "".join(f"; {n} line(s) in {e}" for e, n in self.legacy.most_common()),
            "examples": self.examples, "task": task, "separator": self.sep,
            "classes": dict(self.labels.most_common()) if task == "classification" else None,
            "length_unit": "tokens" if self.tok is not None else "characters", "context": self.context,
            "length": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": self.max_len,
                       "measured": self.sampled},
            "duplicates": self.duplicates, "conflicts": self.conflicts,
            "recommended_epochs": recommended_epochs(self.size),
        }
        fix = None
        if self.fix_out is not None:
            fix = FixResult(self.fix_out if self.written else None, self.written,
                            dict(sorted(self.changes.items())), sorted(self.left_out), self.left_out_count)
        problems = sorted(self.problems, key=lambda p: p.line or 0)
        return Report(self.source, problems, dict(self.counts), summary, fix, self.unfixable)


class _NothingWritten(Exception):
    """No example survived --fix: the fixed copy is not created."""


def validate_file(uri: str, tokenizer: Any = None, context: int | None = None,
                  fix_out: str | None = None, index: Any = None) -> Report:
    """The report on one JSONL file (local or s3://); with ``fix_out``, a corrected copy is written
    there (never over ``uri``). Raises DataError only when the file cannot be read at all.

    ``index`` (prepare's ``LineIndex``) is told every line's byte offset and every example's line.
    """
    src = storage.normalize(uri)
    if fix_out is not None:
        refuse_same(src, fix_out)
        fix_out = storage.normalize(fix_out)
    fs, path = storage.filesystem(src)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: no such file")
    v = _Validator(src, info.size, tokenizer, (context or 2048) if tokenizer is not None else None, fix_out)
    v.index = index
    try:
        with open_output(fix_out) if fix_out is not None else nullcontext() as out:
            v.out = out
            v.run(read_chunks(src))
            if out is not None and not v.written:
                raise _NothingWritten
    except _NothingWritten:
        pass
    return v.report()


def validate_records(source: str, size: int, records: Iterable[tuple[int, Any, Any]],
                     index: Any = None) -> Report:
    """The report on the (line or row, prompt, completion) records of a CSV or Parquet file, by
    the same rules as a JSONL file's lines (``index`` as for ``validate_file``)."""
    v = _Validator(source, size, None, None, None)
    v.index = index
    for n, prompt, completion in records:
        v.feed_record(n, prompt, completion)
    v.finish()
    return v.report()


def load_model(path: str) -> tuple[Any, int]:
    """A HF folder's tokenizer and context length (max_position_embeddings; 2048 if unknown)."""
    from orchestrator.models import context_length, load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer from this folder ({e})") from None
    try:
        return tokenizer, context_length(path)
    except (OSError, ValueError):
        return tokenizer, 2048
