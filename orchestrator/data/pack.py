"""Packing tokenized examples into rows of at most ``max_len`` tokens, without leaks.

A packed row holds whole examples back to back. Each example's position ids restart at 0, which
is how transformers tells examples apart when no attention mask is given (a block-diagonal causal
mask from ``find_packed_sequence_indices``), and each example's first label is IGNORE, so the
last token of one example never learns to predict the first token of the next.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import numpy as np
import pyarrow as pa

from orchestrator.data.tokenize import IGNORE, Encoded


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Bins of example indices, each summing to at most ``capacity``: best-fit decreasing (the
    longest first, each into the fullest bin it still fits). Deterministic; O(n log n) searches."""
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    bins: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable").tolist():
        n = int(lengths[i])
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
            room -= n
        else:
            b, room = len(bins), capacity - n
            bins.append([i])
        if room > 0:
            insort(free, (room, b))
    return bins


def gather_rows(enc: Encoded, labels: np.ndarray, rows: list[list[int]], packed: bool) -> dict[str, pa.Array]:
    """Arrow list columns input_ids, labels, position_ids (and examples per row) for ``rows``, each
    a list of example indices into ``enc``; position ids restart at 0 at every example's start."""
    order = np.fromiter((i for r in rows for i in r), dtype=np.int64)
    lengths, starts = enc.lengths[order], enc.starts[order]
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths  # each example's first token in the output
    within = np.arange(total, dtype=np.int64) - np.repeat(first, lengths)
    take = within + np.repeat(starts, lengths)
    ids, lab = enc.ids[take], labels[take]
    if packed and len(first):
        lab[first] = IGNORE
    per_row = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    row_ends = np.cumsum(per_row)
    tokens_per_row = np.add.reduceat(lengths, row_ends - per_row) if len(rows) else np.zeros(0, np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(tokens_per_row)]).astype(np.int32))

    def column(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values.astype(np.int32, copy=False)))

    return {"input_ids": column(ids), "labels": column(lab), "position_ids": column(within),
            "examples": pa.array(per_row.astype(np.int32))}
