"""Tokenizing prompt/completion pairs so that only completion tokens carry loss.

The training text is tokenized once, whole, and the completion's first token is found from
character offsets: tokenizing prompt and completion apart and concatenating would differ where BPE
merges across the boundary. Masks are by position, never by token id, so the completion's own
``<|endoftext|>`` keeps its loss even though GPT-NeoX pads with the same id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.generation import prompt_text

IGNORE = -100


def tokenize_pair(tokenizer, prompt: str, completion: str) -> dict[str, list[int]]:
    """input_ids and labels for one example; labels are IGNORE on every prompt-only token."""
    batch = tokenize_batch(tokenizer, [prompt], [completion])
    return {"input_ids": batch["input_ids"][0], "labels": batch["labels"][0]}


def tokenize_batch(tokenizer, prompts: list[str], completions: list[str]) -> dict[str, list[list[int]]]:
    """Tokenize each prompt + completion once, whole, with one call into the fast tokenizer.

    An empty prompt (open-ended generation) is conditioned on ``<|endoftext|>``, as at inference
    (``generation.prompt_text``), so the completion's first token is learned too.
    """
    prompts = [prompt_text(p) for p in prompts]
    texts = [p + c for p, c in zip(prompts, completions, strict=True)]
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=False)
    all_labels = []
    for prompt, ids, offsets in zip(prompts, enc["input_ids"], enc["offset_mapping"], strict=True):
        b = len(prompt)
        # A token ending after the boundary holds completion text: it must be predicted.
        all_labels.append([t if end > b else IGNORE for t, (_, end) in zip(ids, offsets, strict=True)])
    return {"input_ids": [list(x) for x in enc["input_ids"]], "labels": all_labels}


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
