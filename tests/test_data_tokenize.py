"""Tokenization: only completion tokens carry loss; masks are by position, never by token id."""

from __future__ import annotations

import pytest

from orchestrator.data.jsonl import read_examples
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


def test_read_examples_errors_name_file_line_and_code(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": " b<|endoftext|>"}\n{"prompt": "a"}\nnot json\n[1]\n'
                     b'{"prompt": 1, "completion": " x<|endoftext|>"}\n')
    with pytest.raises(DataError) as e:
        read_examples(str(path))
    msg = str(e.value)
    assert f"{path}:2: missing-key: no 'completion' key" in msg
    assert f"{path}:3: invalid-json" in msg
    assert f"{path}:4: not-object: the line holds an array" in msg
    assert f"{path}:5: not-string: prompt is a number (1)" in msg


def test_read_examples_not_utf8_names_line_and_encoding(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes('{"prompt": "ok", "completion": " x<|endoftext|>"}\n{"prompt": "café", "completion": " x<|endoftext|>"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"train.jsonl:2: not-utf8: .*Latin-1"):
        read_examples(str(path))
