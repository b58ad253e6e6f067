"""Splitting a JSONL dataset into train and test files.

Classification data is stratified (each class keeps its share, and every class with two or more
examples gets at least one test example); the split is deterministic by seed, and lines are copied
byte for byte. Two streaming passes: labels first, then the copy, so big files stay cheap.
"""

from __future__ import annotations

import json
import posixpath
import random
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from orchestrator import storage
from orchestrator.data.lines import iter_lines, open_output, read_chunks, refuse_same
from orchestrator.data.report import MAX_REPORTED
from orchestrator.errors import DataError
from orchestrator.spec import EOT

MAX_CLASSES, MAX_LABEL = 100, 50  # more classes, or longer labels: the task is generation


def class_label(completion: str) -> str:
    """The class a completion names: its text without the leading space and ``<|endoftext|>``."""
    return completion.removesuffix(EOT).strip()


def is_classification(classes: int, examples: int) -> bool:
    """Few distinct short completions: at most 100 classes, at least 3 examples per class on average."""
    return 0 < classes <= MAX_CLASSES and 3 * classes <= examples


@dataclass
class SplitResult:
    train: str
    test: str
    train_count: int
    test_count: int
    stratified: bool
    classes: dict[str, tuple[int, int]] | None  # class -> (train, test) when stratified


def _example_lines(src: str) -> Iterator[tuple[int, int, bytes, bool]]:
    """(example index, 1-based line, bytes, whole) of every non-blank line, a UTF-8 BOM dropped;
    ``whole`` is False for a line over MAX_LINE, of which only the start was read."""
    i = 0
    for n, raw in enumerate(iter_lines(read_chunks(src)), 1):
        data = raw.data.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw.data
        if data.strip():
            yield i, n, data, len(raw.data) == raw.size
            i += 1


def _labels(src: str) -> tuple[int, list[str] | None, array | None]:
    """Example count and, while the completions look like classes, each example's class id."""
    names: dict[str, int] = {}
    ids: array | None = array("l")
    problems: list[str] = []
    count = 0
    for _, n, data, whole in _example_lines(src):
        count += 1
        try:
            obj = json.loads(data) if whole else None
            ok = isinstance(obj, dict) and all(isinstance(obj.get(k), str) for k in ("prompt", "completion"))
        except ValueError:
            ok = False
        if not ok:
            problems.append(f"{src}:{n}: not a JSON object with string prompt and completion")
            continue
        if ids is not None:
            label = class_label(obj["completion"])
            if len(label) > MAX_LABEL or (label not in names and len(names) >= MAX_CLASSES):
                ids = None
            else:
                ids.append(names.setdefault(label, len(names)))
    if problems:
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} bad line(s); run forge data validate {src} (--fix OUT) first:\n  "
                        + "\n  ".join(problems[:MAX_REPORTED]) + more)
    return count, (list(names) if ids is not None else None), ids


def split_file(src: str, test_fraction: float, seed: int = 0, out_dir: str | None = None) -> SplitResult:
    """Write ``<stem>.train.jsonl`` and ``<stem>.test.jsonl`` into ``out_dir`` (default: beside the
    file); the same file, fraction and seed always give the same two files."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"--test-fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    src = storage.normalize(src)
    if not storage.exists(src):
        raise DataError(f"{src}: no such file")
    folder, name = posixpath.split(src)
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    out_dir = storage.normalize(out_dir) if out_dir else folder
    train_uri = storage.join(out_dir, f"{stem}.train.jsonl")
    test_uri = storage.join(out_dir, f"{stem}.test.jsonl")
    for uri in (train_uri, test_uri):
        refuse_same(src, uri)
    n, names, ids = _labels(src)
    if n < 2:
        raise DataError(f"{src}: {n} example(s); a split needs at least 2")
    rng = random.Random(seed)
    test: set[int] = set()
    classes = None
    stratified = names is not None and is_classification(len(names), n)
    if stratified:
        members: dict[int, array] = {}
        for i, c in enumerate(ids):
            members.setdefault(c, array("l")).append(i)
        classes = {}
        for c in sorted(members, key=lambda c: names[c]):
            idx = members[c]
            rng.shuffle(idx)
            k = min(max(round(len(idx) * test_fraction), 1), len(idx) - 1) if len(idx) >= 2 else 0
            test.update(idx[:k])
            classes[names[c]] = (len(idx) - k, k)
    else:
        k = min(max(round(n * test_fraction), 1), n - 1)
        test = set(rng.sample(range(n), k))
    with open_output(train_uri) as train_f, open_output(test_uri) as test_f:
        for i, _, data, _ in _example_lines(src):
            (test_f if i in test else train_f).write(data + b"\n")
    return SplitResult(train_uri, test_uri, n - len(test), len(test), stratified, classes)
