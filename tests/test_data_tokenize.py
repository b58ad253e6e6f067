"""Tokenization: only completion tokens carry loss; masks are by position, never by token id."""

from __future__ import annotations

import pytest

from orchestrator.data.jsonl import parse_examples
from orchestrator.data.tokenize import IGNORE, pad_batch, tokenize_batch, tokenize_pair
from orchestrator.errors import DataError
from orchestrator.models import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"Ticket {i}: refund please\nTeam: Billing<|endoftext|>" for i in range(50)]
    texts += ["Ticket: parcel late\nTeam: Shipping<|endoftext|>"] * 50
    return train_tokenizer(texts, 400)


def test_labels_ignore_exactly_the_prompt(tokenizer):
    prompt, completion = "Ticket 3: refund please\nTeam:", " Billing<|endoftext|>"
    row = tokenize_pair(tokenizer, prompt, completion)
    whole = tokenizer(prompt + completion, return_offsets_mapping=True, add_special_tokens=False)
    assert row["input_ids"] == whole["input_ids"]  # tokenized once, whole
    n_prompt = sum(1 for _, end in whole["offset_mapping"] if end <= len(prompt))
    assert row["labels"][:n_prompt] == [IGNORE] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tokenizer.decode([t for t in row["labels"] if t != IGNORE]) == completion


def test_completion_end_of_text_carries_loss(tokenizer):
    row = tokenize_pair(tokenizer, "Ticket: parcel late\nTeam:", " Shipping<|endoftext|>")
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["labels"][-1] == tokenizer.eos_token_id


def test_token_spanning_the_boundary_is_a_completion_token(tokenizer):
    # "Team" + ": Billing" - whatever BPE merges across the boundary must carry loss.
    prompt, completion = "Ticket 1: refund please\nTe", "am: Billing<|endoftext|>"
    row = tokenize_pair(tokenizer, prompt, completion)
    enc = tokenizer(prompt + completion, return_offsets_mapping=True, add_special_tokens=False)
    for tok, lab, (start, end) in zip(row["input_ids"], row["labels"], enc["offset_mapping"], strict=True):
        assert (lab == IGNORE) == (end <= len(prompt))
        if start < len(prompt) < end:
            assert lab == tok


def test_padding_is_ignored_by_position_even_with_pad_equal_to_eos(tokenizer):
    rows = [
        tokenize_pair(tokenizer, "Ticket: parcel late\nTeam:", " Shipping<|endoftext|>"),
        tokenize_pair(tokenizer, "Ticket 12: refund please refund please\nTeam:", " Billing<|endoftext|>"),
    ]
    eos = tokenizer.eos_token_id
    batch = pad_batch(rows, pad_id=eos)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and ids.shape[1] % 8 == 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert mask[i, :n].tolist() == [1] * n and mask[i, n:].sum() == 0
        assert labels[i, :n].tolist() == r["labels"]
        assert (labels[i, n:] == IGNORE).all()  # padding: ignored
        assert (ids[i, n:] == eos).all()
        assert labels[i, n - 1] == eos  # the real end of text: kept


def test_empty_prompt_is_conditioned_on_end_of_text(tokenizer):
    """Open-ended examples: the completion's first token is learned after <|endoftext|>, the
    same context ``generation.complete`` gives an empty prompt at inference."""
    row = tokenize_pair(tokenizer, "", " refund please<|endoftext|>")
    assert row["input_ids"][0] == tokenizer.eos_token_id and row["labels"][0] == IGNORE
    assert row["labels"][1:] == row["input_ids"][1:]


def test_batch_and_single_tokenization_agree(tokenizer):
    prompts = ["Ticket: parcel late\nTeam:", "Ticket 7: refund please\nTeam:"]
    completions = [" Shipping<|endoftext|>", " Billing<|endoftext|>"]
    batch = tokenize_batch(tokenizer, prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        one = tokenize_pair(tokenizer, p, c)
        assert batch["input_ids"][i] == one["input_ids"] and batch["labels"][i] == one["labels"]


def test_pad_batch_accepts_ray_data_columns(tokenizer):
    import numpy as np

    rows = [tokenize_pair(tokenizer, "Ticket: parcel late\nTeam:", " Shipping<|endoftext|>")] * 2
    cols = {"input_ids": np.array([np.array(r["input_ids"]) for r in rows], dtype=object),
            "labels": np.array([np.array(r["labels"]) for r in rows], dtype=object)}
    assert (pad_batch(cols, 1)["labels"] == pad_batch(rows, 1)["labels"]).all()


def test_jsonl_errors_name_file_and_line():
    data = b'{"prompt": "a", "completion": " b"}\n{"prompt": "a"}\nnot json\n[1]\n{"prompt": 1, "completion": " x"}\n'
    with pytest.raises(DataError) as e:
        parse_examples(data, "train.jsonl")
    msg = str(e.value)
    assert "train.jsonl:2: field 'completion' is missing" in msg
    assert "train.jsonl:3: invalid JSON" in msg
    assert "train.jsonl:4: expected an object" in msg
    assert "train.jsonl:5: field 'prompt' must be a string, got int" in msg


def test_jsonl_not_utf8_names_line_and_encoding():
    data = '{"prompt": "ok", "completion": " x"}\n{"prompt": "café", "completion": " x"}\n'.encode("latin-1")
    with pytest.raises(DataError, match=r"train.jsonl:2: not UTF-8 .*Latin-1"):
        parse_examples(data, "train.jsonl")
