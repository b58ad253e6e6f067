"""Prompt/completion examples of a whole (small) file as a list, e.g. a held-out set to score.

A thin view on ``sources.iter_examples``, the one reader of every format: a file with errors is a
DataError listing each one with its line.
"""

from __future__ import annotations

from orchestrator.data.sources import Example, Source, iter_examples

__all__ = ["Example", "read_examples"]


def read_examples(uri: str, fmt: str = "auto") -> list[Example]:
    """Every example of ``uri`` (JSONL, CSV or Parquet with prompt/completion columns)."""
    return list(iter_examples(Source.of(uri, fmt)))
