"""Choosing each row's next token in a batch, every row with its own sampling parameters.

The semantics are transformers' (``model.generate`` and ``orchestrator.generation``), applied in
its order: repetition penalty on every token already in the row (prompt included), then
temperature, top-k (0: off), top-p (1: off), then a draw from the softmax. ``top_k == 1`` is
greedy (argmax after the repetition penalty), as is a temperature below ``GREEDY_BELOW``, where
dividing by it could overflow and the draw is the argmax anyway. OpenAI's presence and frequency
penalties (off by default) subtract from the logits of generated tokens, as OpenAI defines them.
"""

from __future__ import annotations

import torch

from serve.protocol import GREEDY_BELOW, SamplingParams

__all__ = ["GREEDY_BELOW", "SamplingParams", "apply_penalties", "choose_tokens", "top_logprobs"]

def _vector(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: torch.Tensor,
    counts: torch.Tensor,
) -> torch.Tensor:
    """Logits after the repetition penalty (tokens in ``seen``) and presence/frequency penalties.

    ``seen`` [B, V] marks tokens of the prompt or generated so far; ``counts`` [B, V] counts the
    generated ones.
    """
    rep = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in rep):
        r = _vector(rep, logits)[:, None]
        penalized = torch.where(logits < 0, logits * r, logits / r)
        logits = torch.where(seen & (r != 1.0), penalized, logits)
    pres = [p.presence_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    if any(pres) or any(freq):
        c = counts.to(logits.dtype)
        logits = logits - _vector(freq, logits)[:, None] * c
        logits = logits - _vector(pres, logits)[:, None] * (c > 0).to(logits.dtype)
    return logits


def _filtered(scores: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate tokens (descending) and their scores with top-k/top-p removals set to -inf."""
    vocab = scores.shape[-1]
    ks = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    # Only the k best can survive top-k, so a top-k row never needs a full sort.
    width = vocab if any(p.top_k == 0 for p in params) else max(ks)
    values, candidates = torch.topk(scores, width, dim=-1, sorted=True)
    cols = torch.arange(width, device=scores.device)[None, :]
    k = torch.tensor(ks, device=scores.device)[:, None]
    values = values.masked_fill(cols >= k, float("-inf"))
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        probs = values.softmax(dim=-1)
        # transformers sorts ascending and drops tokens whose cumulative mass is <= 1 - top_p;
        # in descending order that cumulative mass is the suffix sum.
        tail = probs.flip(-1).cumsum(-1).flip(-1)
        tp = _vector(top_p, values)[:, None]
        remove = (tail <= 1.0 - tp) & (tp < 1.0)
        remove[:, 0] = False  # always keep the best token
        values = values.masked_fill(remove, float("-inf"))
    return values, candidates


def choose_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """The next token of every row [B] from penalised ``logits`` [B, V] (float32)."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    idx = torch.tensor(rows, device=logits.device)
    sub = [params[i] for i in rows]
    scores = logits.index_select(0, idx) / _vector([p.temperature for p in sub], logits)[:, None]
    if any(p.filters for p in sub):
        values, candidates = _filtered(scores, sub)
    else:
        values, candidates = scores, None
    probs = values.softmax(dim=-1)
    picks = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    seeded = [j for j, i in enumerate(rows) if generators[i] is not None]
    unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
    if unseeded:
        free = torch.tensor(unseeded, device=logits.device)
        picks[free] = torch.multinomial(probs.index_select(0, free), 1).squeeze(1)
    for j in seeded:
        picks[j] = torch.multinomial(probs[j], 1, generator=generators[rows[j]])[0]
    if candidates is not None:
        picks = candidates.gather(1, picks[:, None]).squeeze(1)
    out[idx] = picks
    return out


def top_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, rows: list[int], k: int
) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For ``rows``: the chosen token's log-probability and the ``k`` most likely tokens.

    Log-probabilities are the model's own distribution (log-softmax of the raw logits, before
    penalties, temperature and filtering), as OpenAI reports them.
    """
    idx = torch.tensor(rows, device=logits.device)
    lp = torch.log_softmax(logits.index_select(0, idx).float(), dim=-1)
    picked = lp.gather(1, chosen.index_select(0, idx)[:, None]).squeeze(1).tolist()
    tops: list[list[tuple[int, float]]] = [[] for _ in rows]
    if k > 0:
        v, i = torch.topk(lp, k, dim=-1)
        tops = [list(zip(ii, vv, strict=True)) for ii, vv in zip(i.tolist(), v.tolist(), strict=True)]
    return picked, tops
