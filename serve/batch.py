"""The tensors of a running batch: a left-padded KV cache that rows join and leave between steps.

Rows join after a prefill of their own (new rows are left-padded among themselves, then both
caches are left-padded to one length and concatenated); rows leave by index selection, and
columns that only padding uses are trimmed. Each row carries its position ids, its pending
next-token logits, and what the repetition and frequency penalties need. This is continuous
batching for any transformers causal LM whose cache is a ``DynamicCache``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` with ``width`` zero columns prepended along ``dim``."""
    if width == 0:
        return t
    shape = list(t.shape)
    shape[dim] = width
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, T] and attention mask [N, T] with every prompt right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def right_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, T] and attention mask [N, T] with every prompt left-aligned (positions from 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, : len(p)] = 1
    return ids.to(device), mask.to(device)


class DecodeBatch:
    """Per-row state of the sequences being decoded together, in row order."""

    def __init__(self, model) -> None:
        from transformers import DynamicCache

        self.model = model
        self.device = model.device
        self.vocab = int(model.config.vocab_size)
        self._new_cache = lambda: DynamicCache(config=model.config)
        self.clear()

    def clear(self) -> None:
        """Drop every row."""
        self.cache = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.logits = torch.zeros(0, self.vocab, device=self.device)
        self.seen = torch.zeros(0, self.vocab, dtype=torch.bool, device=self.device)
        self.counts = torch.zeros(0, self.vocab, dtype=torch.int32, device=self.device)

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def _layers(self, cache) -> list:
        return list(cache.layers)

    @torch.inference_mode()
    def add(self, prompts: Sequence[Sequence[int]]) -> None:
        """Prefill ``prompts`` and append them as new rows (their logits become pending)."""
        ids, mask = left_padded(prompts, self.device)
        cache = self._new_cache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float()
        seen = torch.zeros(len(prompts), self.vocab + 1, dtype=torch.bool, device=self.device)
        seen.scatter_(1, ids.masked_fill(mask == 0, self.vocab), True)  # padding: the spare column
        seen = seen[:, : self.vocab]
        positions = mask.sum(-1)
        if len(self) == 0:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.width, mask.shape[1])
            for old, new in zip(self._layers(self.cache), self._layers(cache), strict=True):
                for name in ("keys", "values"):
                    a, b = getattr(old, name), getattr(new, name)
                    a = _pad_left(a, width - a.shape[-2], dim=-2)
                    b = _pad_left(b, width - b.shape[-2], dim=-2)
                    setattr(old, name, torch.cat([a, b], dim=0))
            self.mask = torch.cat(
                [_pad_left(self.mask, width - self.width, 1), _pad_left(mask, width - mask.shape[1], 1)]
            )
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits])
        self.seen = torch.cat([self.seen, seen])
        self.counts = torch.cat(
            [self.counts, torch.zeros(len(prompts), self.vocab, dtype=torch.int32, device=self.device)]
        )

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order) and trim columns that only padding uses."""
        if len(rows) == len(self):
            return
        if not rows:
            self.clear()
            return
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self._layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, idx)
        self.logits = self.logits.index_select(0, idx)
        self.seen = self.seen.index_select(0, idx)
        self.counts = self.counts.index_select(0, idx)

    def record(self, tokens: torch.Tensor) -> None:
        """Note each row's newly chosen token for the penalties."""
        self.seen.scatter_(1, tokens[:, None], True)
        self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=torch.int32))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> None:
        """Run every row one token forward; their next-token logits become pending."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            cache=self.cache,
            use_cache=True,
        )
        self.positions = self.positions + 1
        self.logits = out.logits[:, -1].float()
