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
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.fs as pafs

from orchestrator import storage
from orchestrator.data.convert import (
    MAX_LINE,
    RawLine,
    decode_legacy,
    detect_separator,
    fix_completion,
    fix_prompt,
    iter_lines,
    open_output,
    read_chunks,
    refuse_same,
    sniff,
    transcode,
)
from orchestrator.data.split import MAX_CLASSES, MAX_LABEL, class_label, is_classification
from orchestrator.errors import DataError
from orchestrator.generation import prompt_text
from orchestrator.spec import EOT, recommended_epochs

KEYS = ("prompt", "completion")
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
SAMPLE, SAMPLE_BYTES = 2000, 8 << 20  # records held back while the separator is detected
BATCH = 512
MAX_KEPT = 100  # problems kept per code; all are counted
RESERVOIR = 100_000  # lengths kept for the percentiles (exact up to this many examples)
TOKEN_SAMPLE, TOKEN_EVERY = 20_000, 8  # with a tokenizer, lengths of these examples are measured
CLASS_MIN, CLASS_TOKENS, CONDITIONAL_MIN, OPEN_ENDED_MIN = 25, 3, 200, 500
_scan = json.JSONDecoder().scan_once  # json.loads without its per-call Python overhead
SHAPE = 'one JSON object per line: {"prompt": "...", "completion": " ...<|endoftext|>"}'
N_EOT = len(EOT)


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


def _json_type(v: Any) -> str:
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return f"a number ({v})"
    return {str: "a string", list: "an array"}.get(type(v), "an object")


class _Rec:
    __slots__ = ("line", "prompt", "completion", "text", "rewrite", "fixes")

    def __init__(self, line: int, obj: dict, text: str, rewrite: bool, fixes: list[str]):
        self.line, self.prompt, self.completion = line, obj["prompt"], obj["completion"]
        self.text, self.rewrite, self.fixes = text, rewrite, fixes


class _Validator:
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
        self.pending: list[_Rec] = []
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
        self.examples += 1
        self.pending.append(_Rec(n, obj, text, rewrite, fixes))
        self.pending_bytes += len(text)
        if not self.sep_decided and (len(self.pending) >= SAMPLE or self.pending_bytes >= SAMPLE_BYTES):
            self._decide()
        if self.sep_decided and len(self.pending) >= BATCH:
            self._flush()

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

    def _decide(self) -> None:
        """Fix the separator from the records held back so far."""
        prompts = [r.prompt for r in self.pending if r.prompt]
        if 2 * len(prompts) > len(self.pending):  # not open-ended
            self.sep, self.sep_others, self.sep_share = detect_separator(prompts)
            if self.sep is None and len(prompts) >= 2:
                first = next(r for r in self.pending if r.prompt)
                self.add(None, "no-separator", "prompts share no fixed ending to mark where the prompt "
                         f"ends (line {first.line}'s prompt ends with {first.prompt[-20:]!r})",
                         "end every prompt with one separator that appears nowhere else in prompts, "
                         "e.g. '\\n\\n###\\n\\n' or '\\nCategory:', and end prompts with it at inference")
        self.sep_decided = True

    def _flush(self) -> None:
        batch, self.pending, self.pending_bytes = self.pending, [], 0
        if not batch:
            return
        fixed = [(fix_prompt(r.prompt, self.sep), fix_completion(r.completion)) for r in batch]
        lengths = self._token_lengths(fixed) if self.tok else [len(p) + len(c) for p, c in fixed]
        out: list[str] = []
        for r, (p, c), length in zip(batch, fixed, lengths, strict=True):
            if self._check(r, p, c, length) and self.out is not None:
                changed = r.rewrite or p != r.prompt or c != r.completion
                out.append(json.dumps({"prompt": p, "completion": c}, ensure_ascii=False) if changed else r.text)
        if out:
            self.written += len(out)
            self.out.write(("\n".join(out) + "\n").encode())

    def _token_lengths(self, fixed: list[tuple[str, str]]) -> list[int | None]:
        """Token counts as training sees them, for examples that may not fit (a byte-level BPE token
        holds at least one byte, so one of at most ``context`` bytes fits) and for a sample of the
        rest (the first TOKEN_SAMPLE, then one in TOKEN_EVERY); None where not tokenized. Text past
        16 characters a token is not tokenized: it cannot fit."""
        limit, ctx = 16 * self.context, self.context
        texts = [prompt_text(p) + c for p, c in fixed]
        todo = [i for i, t in enumerate(texts) if len(t.encode()) > ctx or self.measured + i < TOKEN_SAMPLE
                or (self.measured + i) % TOKEN_EVERY == 0]
        self.measured += len(texts)
        ids = self.tok([texts[i][:limit] for i in todo], add_special_tokens=False)["input_ids"] if todo else []
        lengths: list[int | None] = [None] * len(texts)
        for i, tokens in zip(todo, ids, strict=True):
            lengths[i] = len(tokens) if len(texts[i]) <= limit else max(len(tokens), ctx + 1)
        return lengths

    def _check(self, r: _Rec, p: str, c: str, length: int | None) -> bool:
        """Check one record (p, c: its fixed prompt and completion); True when it goes into the fixed
        copy. The common case, a clean record, costs a handful of string tests."""
        sep, n = self.sep, r.line
        clean = (p == r.prompt and c == r.completion and c.find(EOT) == len(c) - N_EOT
                 and not c[1:-N_EOT].isspace() and len(c) > N_EOT + 1 and EOT not in p
                 and (not p or not sep or p.find(sep) == len(p) - len(sep))
                 and (length is None or self.tok is None or length <= self.context))
        fixes = list(r.fixes)
        bad = not clean and self._rules(r, p, c, length, fixes)
        self.checked += 1
        self.empty_prompts += not p
        if length is not None:
            self.sampled += 1
            self.max_len = max(self.max_len, length)
            if len(self.lengths) < RESERVOIR:
                self.lengths.append(length)
            elif (j := self.rng.randrange(self.sampled)) < RESERVOIR:
                self.lengths[j] = length
        if self.labels is not None:
            label = class_label(c)
            if len(label) > MAX_LABEL or (label not in self.labels and len(self.labels) >= MAX_CLASSES):
                self.labels = None
            else:
                self.labels[label] += 1
        # duplicates and conflicts, compared after the mechanical fixes
        ch = hash(c) & 0xFFFFFFFFFFFFFFFF
        first = self.firsts.setdefault(hash(p), ch << 32 | n)
        if first != ch << 32 | n:
            same = first >> 32 == ch
            earlier = (first & 0xFFFFFFFF) if same else self.pairs.setdefault(hash((p, c)), n)
            if same or earlier != n:
                self.duplicates += 1
                self.add(n, "duplicate", f"same prompt and completion as line {earlier}", "remove the copy "
                         "(--fix drops exact duplicates)", None, True)
                if not bad and self.out is not None:
                    self.changes["duplicate"] += 1
                return False
            if p:
                self.conflicts += 1
                self.add(n, "conflict", f"same prompt as line {first & 0xFFFFFFFF} with a different "
                         "completion", "keep one completion per prompt (contradicting labels teach "
                         "noise), or make the prompts differ", "completion")
        if bad:
            return False
        if self.out is not None:
            self.changes.update(fixes)
        return True

    def _rules(self, r: _Rec, p: str, c: str, length: int | None, fixes: list[str]) -> bool:
        """Name each broken rule of one record; True when --fix cannot repair it."""
        n, prompt, completion, sep = r.line, r.prompt, r.completion, self.sep
        bad = False
        if prompt != prompt.rstrip() and not (sep and prompt.endswith(sep)):
            self.add(n, "prompt-trailing-whitespace", f"prompt ends with whitespace "
                     f"{prompt[len(prompt.rstrip()):]!r}", "remove it: the completion's leading space "
                     "separates the words (--fix strips it)", "prompt", True)
            fixes.append("prompt-trailing-whitespace")
        if EOT in prompt:
            self.add(n, "eot-inside", "prompt contains <|endoftext|>", "remove it from the prompt: it "
                     "marks the end of a document", "prompt")
            bad = True
        if prompt and sep:
            other = next((e for e in self.sep_others if p.endswith(e)), None)
            bad = True
            if other:
                self.add(n, "separator-inconsistent", f"prompt ends with {other!r}, but {self.sep_share:.0%}"
                         f" of prompts end with the separator {sep!r}", "end every prompt with the same "
                         f"separator {sep!r}", "prompt")
            elif not p.endswith(sep):
                self.add(n, "separator-missing", f"prompt does not end with the separator {sep!r} "
                         f"({self.sep_share:.0%} of prompts do); it ends with {p[-20:]!r}",
                         f"append {sep!r} to the prompt (and end prompts with it at inference)", "prompt")
            elif sep in p[: -len(sep)]:
                self.add(n, "separator-in-prompt", f"the separator {sep!r} also appears inside the prompt "
                         f"(at character {p.index(sep) + 1}): the model cannot tell where the prompt ends",
                         "remove it from the text, or use a separator no prompt contains, e.g. "
                         "'\\n\\n###\\n\\n'", "prompt")
            else:
                bad = False
        body = completion.removesuffix(EOT)
        if not body.strip():
            self.add(n, "empty-completion", "completion has no text", "write the text the model should "
                     "produce after the prompt", "completion")
            return True
        if not completion.startswith(" "):
            self.add(n, "completion-leading-space", f"completion starts with {completion[:12]!r}, not a "
                     "space", "start it with one space, e.g. ' Billing<|endoftext|>' (--fix adds it)",
                     "completion", True)
            fixes.append("completion-leading-space")
        if not completion.endswith(EOT):
            self.add(n, "completion-missing-eot", f"completion does not end with <|endoftext|> (it ends "
                     f"with {completion[-12:]!r})", "append <|endoftext|> so the model learns where to "
                     "stop (--fix adds it)", "completion", True)
            fixes.append("completion-missing-eot")
        if EOT in body:
            self.add(n, "eot-inside", "completion has <|endoftext|> before its end", "keep "
                     "<|endoftext|> only at the very end", "completion")
            bad = True
        if self.tok is not None and length is not None and length > self.context:
            self.add(n, "too-long", f"prompt + completion is {length} tokens, over the model's context of "
                     f"{self.context}", "shorten the prompt or the completion, or split the example",
                     "completion")
            bad = True
        return bad

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
                  fix_out: str | None = None) -> Report:
    """The report on one JSONL file (local or s3://); with ``fix_out``, a corrected copy is written
    there (never over ``uri``). Raises DataError only when the file cannot be read at all."""
    src = storage.normalize(uri)
    if fix_out is not None:
        refuse_same(src, fix_out)
        fix_out = storage.normalize(fix_out)
    fs, path = storage.filesystem(src)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise DataError(f"{uri}: no such file")
    v = _Validator(src, info.size, tokenizer, (context or 2048) if tokenizer is not None else None, fix_out)
    try:
        with open_output(fix_out) if fix_out is not None else nullcontext() as out:
            v.out = out
            v.run(read_chunks(src))
            if out is not None and not v.written:
                raise _NothingWritten
    except _NothingWritten:
        pass
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
