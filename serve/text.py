"""Text of a growing token sequence, and stop sequences matched on that text.

Byte-level BPE tokens can split a UTF-8 character, and a stop sequence can span several tokens,
so both are handled on decoded text: :class:`IncrementalText` decodes a short window of recent
tokens and only commits text that ends on a whole character (its concatenated output equals
``tokenizer.decode`` of all the tokens); :class:`StopMatcher` finds the earliest stop sequence in
that text and says how much of it is safe to stream, holding back a tail that may still become a
stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.spec import EOT

REPLACEMENT = "\ufffd"


class IncrementalText:
    """The decoded text of the tokens added so far, extended one token at a time."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start: a token that begins on a character boundary
        self._read = 0  # tokens before this are committed to ``text``

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append a token; returns the newly committed text (empty while a character is split)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        delta = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """Commit whatever is pending (a split character becomes U+FFFD, as ``decode`` does)."""
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix : self._read])
        delta = self._decode(self.ids[self._prefix :])[len(before) :]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta


class StopMatcher:
    """Stop sequences (``<|endoftext|>`` always among them) found in decoded text."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(dict.fromkeys([EOT, *(s for s in stops if s)]))
        self._longest = max(len(s) for s in self.stops)

    def find(self, text: str, new_from: int = 0) -> int | None:
        """Index of the earliest stop in ``text``; only matches ending at or after ``new_from``
        are looked for (earlier text was searched before)."""
        start = max(0, new_from - self._longest + 1)
        hits = [i for s in self.stops if (i := text.find(s, start)) != -1]
        return min(hits) if hits else None

    def safe_end(self, text: str) -> int:
        """How much of ``text`` may be shown: all but a tail that is the start of a stop."""
        tail = text[-(self._longest - 1) :] if self._longest > 1 else ""
        for n in range(len(tail), 0, -1):
            piece = tail[-n:]
            if any(s.startswith(piece) for s in self.stops):
                return len(text) - n
        return len(text)
