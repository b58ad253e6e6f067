"""What every checkpoint measures: validation loss and the test prompts' completions.

Both run on every rank in lockstep: under ZeRO-3 each forward pass gathers parameters with
collectives, so every rank must make the same number of forward calls.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.data.tokenize import IGNORE
from orchestrator.generation import Sampling, complete
from orchestrator.spec import TestPrompt


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (unchanged when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, rows: list[dict[str, Any]], micro_batch: int, pad_id: int, device,
             classification: bool) -> dict[str, float | None]:
    """Validation loss per completion token and, for classification, exact-match accuracy, over
    all ranks' shares of the validation rows (``rows`` is this rank's share).

    Exact match is decided in the same forward pass: greedy decoding reproduces the expected
    completion (its ``<|endoftext|>`` included) exactly when, at every completion position, the
    most likely next token given the expected prefix is the expected one. Ranks with fewer rows
    run dummy batches (labels all ignored) so forward calls stay matched under ZeRO-3.
    """
    from orchestrator.train.data import collate

    world = dist.get_world_size() if dist.is_initialized() else 1
    n_batches = math.ceil(len(rows) / micro_batch) if rows else 0
    n_batches = int(_all_reduce_max(n_batches, device, world))
    engine.eval()
    loss_sum, tokens, correct, examples = 0.0, 0, 0, 0
    for b in range(n_batches):
        chunk = rows[b * micro_batch : (b + 1) * micro_batch]
        dummy = not chunk
        if dummy:  # nothing left on this rank: any real input, no label counted
            chunk = [{"input_ids": [pad_id], "labels": [IGNORE], "position_ids": [0]}]
        batch = collate(*([r[k] for r in chunk] for k in ("input_ids", "labels", "position_ids")), pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = engine(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                        use_cache=False).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum"))
        scored = labels != IGNORE
        tokens += int(scored.sum())
        if not dummy:
            hit = (logits.argmax(-1) == labels) | ~scored
            correct += int(hit.all(dim=1).sum())
            examples += len(chunk)
    engine.train()
    total, n, right, seen = all_reduce_sum([loss_sum, tokens, correct, examples], device)
    return {"eval_loss": total / max(n, 1),
            "eval_accuracy": right / seen if classification and seen else None}


def _all_reduce_max(value: int, device, world: int) -> int:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def complete_test_prompts(model, tokenizer, prompts: list[TestPrompt], seed: int, distributed: bool) -> list[dict[str, Any]]:
    """Each test prompt's completion with its own sampling parameters, identical on every rank.

    The RNG is forked so that sampling here never changes the training run's random stream.
    """
    was_training = model.training
    model.eval()
    results = []
    with torch.random.fork_rng(devices=[]):
        for i, p in enumerate(prompts):
            torch.manual_seed(seed + i)
            text = complete(model, tokenizer, p.prompt, Sampling.from_obj(p), synced_gpus=distributed)
            results.append({"prompt": p.prompt, "completion": text, "expected": p.expected})
    if was_training:
        model.train()
    return results


def exact_match(completion: str, expected: str) -> bool:
    """A completion matches when it equals the expected one, ignoring surrounding whitespace."""
    return completion.strip() == expected.replace("<|endoftext|>", "").strip()


def test_accuracy(results: list[dict[str, Any]]) -> float | None:
    scored = [r for r in results if r.get("expected") is not None]
    if not scored:
        return None
    return sum(exact_match(r["completion"], r["expected"]) for r in scored) / len(scored)
