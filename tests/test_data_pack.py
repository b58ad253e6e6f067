"""Tokenizing to flat arrays and packing: labels ignore exactly the prompt, positions restart per
example, and a packed row gives every example the same loss as running it alone."""

from __future__ import annotations

import random

import numpy as np
import pytest

from orchestrator.data.pack import best_fit, gather_rows
from orchestrator.data.tokenize import IGNORE, encode_examples, tokenize_batch
from orchestrator.generation import prompt_text
from orchestrator.models import train_tokenizer

WORDS = ["refund", "parcel", "late", "crash", "naïve", "café", "über", "日本", "x", "  ", "\n", "###", ":", "Team"]


def random_examples(n: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(0, 12))
        prompts.append("" if rng.random() < 0.2 else "".join(w + rng.choice(["", " "]) for w in words))
        completions.append(rng.choice(["", " "]) + " ".join(rng.choices(WORDS, k=rng.randint(1, 8)))
                           + "<|endoftext|>")
    return prompts, completions


@pytest.fixture(scope="module")
def tok():
    prompts, completions = random_examples(400, 0)
    return train_tokenizer([p + c for p, c in zip(prompts, completions, strict=True)], 300)


def reference_labels(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """The rule, written the slow way: a token ending after the prompt's last character holds
    completion text and carries loss."""
    p = prompt_text(prompt)
    enc = tokenizer(p + completion, return_offsets_mapping=True, add_special_tokens=False)
    return enc["input_ids"], [t if end > len(p) else IGNORE for t, (_, end) in
                              zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_fast_prompt_mask_equals_the_offsets_rule(tok, trim_offsets):
    """Every token's label agrees with the offsets rule on random text (unicode, spaces, empty
    prompts), also for a tokenizer whose offsets are trimmed of spaces (GPT-NeoX-20B's)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    t = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    prompts, completions = random_examples(500, 1)
    batch = tokenize_batch(t, prompts, completions)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids, labels = reference_labels(t, p, c)
        assert batch["input_ids"][i] == ids and batch["labels"][i] == labels, (p, c)


def test_best_fit_uses_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    bins = best_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # packed tight: near the lower bound (every item over half the capacity needs its own bin)
    assert len(bins) <= 1.05 * max(-(-sum(lengths) // 64), int((lengths > 32).sum()))
    assert bins == best_fit(lengths, 64)  # deterministic


def test_packed_rows_restart_positions_and_ignore_prompts(tok):
    prompts, completions = random_examples(60, 2)
    enc = encode_examples(tok, prompts, completions)
    labels = enc.labels()
    bins = best_fit(enc.lengths, 48)
    cols = gather_rows(enc, labels, bins, packed=True)
    ref = tokenize_batch(tok, prompts, completions)
    for row, b in enumerate(bins):
        ids, lab, pos = (cols[k][row].as_py() for k in ("input_ids", "labels", "position_ids"))
        assert len(ids) == len(lab) == len(pos) <= 48
        assert cols["examples"][row].as_py() == len(b)
        at = 0
        for i in b:
            n = len(ref["input_ids"][i])
            assert ids[at : at + n] == ref["input_ids"][i]
            assert pos[at : at + n] == list(range(n))  # restarts at each example
            assert lab[at] == IGNORE  # never predicted from the previous example
            assert lab[at + 1 : at + n] == ref["labels"][i][1:]  # else exactly tokenize_batch's
            at += n
        assert at == len(ids)
    unpacked = gather_rows(enc, labels, [[i] for i in range(60)], packed=False)
    assert unpacked["labels"].to_pylist() == ref["labels"]
    assert unpacked["position_ids"].to_pylist() == [list(range(len(x))) for x in ref["input_ids"]]


def _per_example_losses(model, ids, labels, positions, segments) -> list[float]:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        kw = {"position_ids": torch.tensor([positions])} if positions is not None else {}
        logits = model(input_ids=torch.tensor([ids]), use_cache=False, **kw).logits[0]
    target = torch.tensor(labels[1:])
    losses = F.cross_entropy(logits[:-1].float(), target, ignore_index=IGNORE, reduction="none")
    out = []
    for a, b in segments:  # the example's tokens a..b-1 are predicted at positions a-1..b-2
        keep = target[a : b - 1] != IGNORE
        out.append(float(losses[a : b - 1][keep].sum() / keep.sum()))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_unpacked_give_the_same_per_example_loss(tok, tmp_path, attn):
    """On a fixed tiny GPT-NeoX: position ids restarting at 0 (no attention mask) keep packed
    examples apart, so each example's loss equals its loss alone (and does not without them)."""
    from transformers import AutoModelForCausalLM

    from orchestrator.models import build_preset

    build_preset("neox-tiny", tok, 0, str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation=attn).eval()
    prompts, completions = random_examples(12, 3)
    prompts[0] = "Ticket: refund\nTeam:"  # a prompt to mask, in the first row
    enc = encode_examples(tok, prompts, completions)
    labels = enc.labels()
    bins = best_fit(enc.lengths, 96)
    assert any(len(b) > 2 for b in bins)
    cols = gather_rows(enc, labels, bins, packed=True)
    checked = 0
    for row, b in enumerate(bins):
        ids, lab, pos = (cols[k][row].as_py() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(ids)]
        segments = list(zip(starts, starts[1:], strict=False))
        packed = _per_example_losses(model, ids, lab, pos, segments)
        leaked = _per_example_losses(model, ids, lab, None, segments)
        for k, i in enumerate(b):
            s, n = int(enc.starts[i]), int(enc.lengths[i])
            alone = _per_example_losses(model, enc.ids[s : s + n].tolist(), labels[s : s + n].tolist(),
                                        None, [(0, n)])[0]
            assert abs(packed[k] - alone) < 1e-5, (row, k, packed[k], alone)
            if k > 0:
                assert abs(leaked[k] - alone) > 1e-4  # the test can fail: attention across examples shows
            checked += 1
    assert checked == 12
