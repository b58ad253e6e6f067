"""Tokenizing prompt/completion pairs so that only completion tokens carry loss.

The training text is tokenized once, whole, and the completion's first token is found from
character offsets: tokenizing prompt and completion apart and concatenating would differ where BPE
merges across the boundary. Masks are by position, never by token id, so the completion's own
``<|endoftext|>`` keeps its loss even though GPT-NeoX pads with the same id.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.generation import prompt_text

IGNORE = -100


@dataclass
class Encoded:
    """A batch of examples as flat arrays (what the prepare pipeline packs without Python lists):
    example ``i`` is ``ids[starts[i] : starts[i] + lengths[i]]``; its first ``prompt_tokens[i]``
    tokens are prompt only and carry no loss."""

    ids: np.ndarray  # int32, every example's tokens back to back
    starts: np.ndarray  # int64
    lengths: np.ndarray  # int64
    prompt_tokens: np.ndarray  # int64

    def labels(self) -> np.ndarray:
        """int32 labels aligned with ``ids``: IGNORE on each example's prompt-only tokens."""
        labels = self.ids.copy()
        in_example = np.arange(len(self.ids)) - np.repeat(self.starts, self.lengths)
        labels[in_example < np.repeat(self.prompt_tokens, self.lengths)] = IGNORE
        return labels


def _prompt_token_count(enc, boundary: int) -> int:
    """How many leading tokens hold only prompt text: the rule is "a token ending after the
    boundary holds completion text", i.e. the index of the token containing the boundary's
    character; offsets are read only when no token contains it (offsets trimmed of spaces)."""
    k = enc.char_to_token(boundary)
    if k is not None:
        return k
    return sum(1 for _, end in enc.offsets if end <= boundary)


def encode_examples(tokenizer, prompts: list[str], completions: list[str]) -> Encoded:
    """Tokenize each prompt + completion once, whole, with one call into the fast tokenizer.

    An empty prompt (open-ended generation) is conditioned on ``<|endoftext|>``, as at inference
    (``generation.prompt_text``), so the completion's first token is learned too. ``tokenizer`` is
    a transformers fast tokenizer or a ``tokenizers.Tokenizer``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    prompts = [prompt_text(p) for p in prompts]
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    encs = backend.encode_batch(texts, add_special_tokens=False)
    id_lists = [e.ids for e in encs]  # each call builds a Python list: once per example
    lengths = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(encs))
    starts = np.zeros(len(encs), dtype=np.int64)
    if len(encs) > 1:
        np.cumsum(lengths[:-1], out=starts[1:])
    ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int32, count=int(lengths.sum()))
    prompt_tokens = np.fromiter((_prompt_token_count(e, len(p)) for e, p in zip(encs, prompts, strict=True)),
                                dtype=np.int64, count=len(encs))
    return Encoded(ids, starts, lengths, prompt_tokens)


def tokenize_batch(tokenizer, prompts: list[str], completions: list[str]) -> dict[str, list[list[int]]]:
    """input_ids and labels (IGNORE on every prompt-only token) as lists, one per example."""
    enc = encode_examples(tokenizer, prompts, completions)
    ids, labels = enc.ids.tolist(), enc.labels().tolist()
    cut = [(int(s), int(s + n)) for s, n in zip(enc.starts, enc.lengths, strict=True)]
    return {"input_ids": [ids[a:b] for a, b in cut], "labels": [labels[a:b] for a, b in cut]}


def tokenize_pair(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """input_ids and labels for one example; labels are IGNORE on every prompt-only token."""
    batch = tokenize_batch(tokenizer, [prompt], [completion])
    return {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}


def pad_batch(rows: list[dict[str, Any]] | dict[str, Any], pad_id: int, multiple_of: int = 8) -> dict[str, Any]:
    """Right-pad a batch to its longest row: pad positions get attention 0 and label IGNORE.

    Accepts a list of rows or Ray Data's column batch (dict of arrays of lists).
    """
    import torch

    if isinstance(rows, dict):
        cols = rows
        rows = [{"input_ids": i, "labels": lab} for i, lab in zip(cols["input_ids"], cols["labels"], strict=True)]
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // multiple_of) * multiple_of
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = r["input_ids"]
        labels[i, :n] = r["labels"]
        mask[i, :n] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
    }
