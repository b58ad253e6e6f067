"""The prompt/completion format's mechanical fixes and separator detection: the one definition
that ``validate --fix`` and ``convert`` both apply."""

from __future__ import annotations

import re
from collections import Counter

from orchestrator.spec import EOT

SEP_MAX = 64  # longest separator looked for
_ENDING = re.compile(r"\s*\S+\s*\Z")  # the last word with the whitespace around it


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
