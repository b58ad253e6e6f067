"""Scoring a checkpoint on held-out data with plain transformers (no forge training code)."""

from __future__ import annotations

from typing import Any

from orchestrator import storage
from orchestrator.data.jsonl import read_examples
from orchestrator.generation import Sampling, complete
from orchestrator.train.evaluation import exact_match


def exact_match_accuracy(model_uri: str, data_uri: str, max_new_tokens: int = 8) -> dict[str, Any]:
    """Greedy completion of every prompt, compared with its completion (classification tasks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = storage.local_copy(model_uri)
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForCausalLM.from_pretrained(local, use_safetensors=True).eval()
    greedy = Sampling(top_k=1, length=max_new_tokens)
    examples = read_examples(data_uri)
    correct = 0
    misses = []
    for e in examples:
        got = complete(model, tokenizer, e.prompt, greedy)
        if exact_match(got, e.completion):
            correct += 1
        else:
            misses.append({"line": e.line, "expected": e.completion, "got": got})
    return {"correct": correct, "total": len(examples), "accuracy": correct / len(examples), "misses": misses}
