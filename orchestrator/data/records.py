"""The rules for one prompt/completion record, checked once the separator is known.

``RecordChecks`` is the record half of the validator in ``validate.py``: it decides the separator
from the records held back, checks each record (format rules, length, duplicates and conflicts)
and writes the fixed copy. It works on the state that ``_Validator.__init__`` sets up and reports
through ``self.add``.
"""

from __future__ import annotations

import json

from orchestrator.data.format import detect_separator, fix_completion, fix_prompt
from orchestrator.data.split import MAX_CLASSES, MAX_LABEL, class_label
from orchestrator.generation import prompt_text
from orchestrator.spec import EOT

RESERVOIR = 100_000  # lengths kept for the percentiles (exact up to this many examples)
TOKEN_SAMPLE, TOKEN_EVERY = 20_000, 8  # with a tokenizer, lengths of these examples are measured
N_EOT = len(EOT)


class Record:
    """One example held back until the separator is known (its line, text, and the fixes so far)."""

    __slots__ = ("line", "prompt", "completion", "text", "rewrite", "fixes")

    def __init__(self, line: int, obj: dict, text: str, rewrite: bool, fixes: list[str]):
        self.line, self.prompt, self.completion = line, obj["prompt"], obj["completion"]
        self.text, self.rewrite, self.fixes = text, rewrite, fixes


class RecordChecks:
    """Record-level checks, mixed into ``_Validator`` (which owns the state and ``add``)."""

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

    def _check(self, r: Record, p: str, c: str, length: int | None) -> bool:
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

    def _rules(self, r: Record, p: str, c: str, length: int | None, fixes: list[str]) -> bool:
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
