"""Completing prompts the same way at every checkpoint and in serving.

Sampling is transformers' own (temperature, top_k, top_p, repetition_penalty as it defines them);
stop sequences are matched on decoded text by transformers' ``stop_strings`` so a stop that spans
tokens is still found, then cut from the output. ``<|endoftext|>`` always stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.spec import EOT


@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    length: int = 64
    stop_sequences: list[str] = field(default_factory=list)
    repetition_penalty: float = 1.0

    @classmethod
    def from_obj(cls, obj: Any) -> Sampling:
        return cls(**{k: getattr(obj, k) for k in cls.__dataclass_fields__})


def generate_kwargs(s: Sampling, tokenizer) -> dict[str, Any]:
    """Keyword arguments for ``model.generate`` from the seed API's sampling fields."""
    kw: dict[str, Any] = dict(
        max_new_tokens=s.length,
        do_sample=True,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k if s.top_k > 0 else None,
        repetition_penalty=s.repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    if s.top_k == 1:  # greedy: identical result, no sampling noise
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    stops = [x for x in s.stop_sequences if x and x != EOT]
    if stops:
        kw.update(stop_strings=stops, tokenizer=tokenizer)
    return kw


def cut_at_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the earliest stop sequence (or ``<|endoftext|>``), the stop itself removed."""
    cut = len(text)
    for s in [EOT, *stops]:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


def prompt_text(prompt: str) -> str:
    """The text the model is conditioned on. An empty prompt (open-ended generation) becomes
    ``<|endoftext|>``: GPT-NeoX documents start after it, and training prepends it the same way."""
    return prompt or EOT


def complete(model, tokenizer, prompt: str, s: Sampling, synced_gpus: bool = False) -> str:
    """One completion of ``prompt`` (the prompt text exactly as in training, no extra tokens)."""
    import torch

    ids = tokenizer(prompt_text(prompt), return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            synced_gpus=synced_gpus,
            **generate_kwargs(s, tokenizer),
        )
    new = out[0, ids.shape[1] :]
    text = tokenizer.decode(new, skip_special_tokens=False)
    return cut_at_stop(text, s.stop_sequences)
