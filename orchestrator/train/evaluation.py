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

from orchestrator.data.tokenize import IGNORE, pad_batch
from orchestrator.generation import Sampling, complete
from orchestrator.spec import TestPrompt


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (unchanged when not distributed)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate_loss(engine, rows: list[dict[str, Any]], micro_batch: int, pad_id: int, device) -> float:
    """Mean loss per completion token over all ranks' share of ``rows`` (already this rank's share).

    Ranks with fewer rows run dummy batches (labels all ignored) so forward calls stay matched.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    n_batches = math.ceil(len(rows) / micro_batch) if rows else 0
    n_batches = int(_all_reduce_max(n_batches, device, world))
    engine.eval()
    loss_sum, count = 0.0, 0
    for b in range(n_batches):
        chunk = rows[b * micro_batch : (b + 1) * micro_batch]
        dummy = not chunk
        if dummy:  # nothing left on this rank: any real input, no label counted
            chunk = [{"input_ids": [pad_id], "labels": [IGNORE]}]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_id).items()}
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=IGNORE, reduction="sum",
        )
        loss_sum += float(loss)
        count += int((labels != IGNORE).sum())
    engine.train()
    total, n = all_reduce_sum([loss_sum, count], device)
    return total / max(n, 1)


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
