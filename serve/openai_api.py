"""Both APIs' request-to-call and result-to-response mappings (seed and OpenAI-compatible).

Kept apart from the routes so the shapes can be read (and tested) in one place. OpenAI's legacy
completions shape: ``choices[i]`` is prompt ``i // n``'s ``i % n``-th completion; ``logprobs``
carries ``tokens``, ``token_logprobs``, ``top_logprobs`` and ``text_offset``; streaming sends one
``text_completion`` chunk per piece of text as a server-sent event, then ``data: [DONE]``.
"""

from __future__ import annotations

import base64
import json
import struct
import time
import uuid
from typing import Any

from serve.errors import BadRequest
from serve.protocol import EmbedCall, GenerateCall, SamplingParams
from serve.schemas import MAX_ROWS, OpenAICompletion, SeedComplete


def seed_call(req: SeedComplete, deadline: float | None) -> GenerateCall:
    params = SamplingParams(
        max_tokens=req.length, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        repetition_penalty=req.repetition_penalty, stop=tuple(req.stop_sequences))
    return GenerateCall([req.text], params, req.n, deadline, "text", "length")


def openai_call(req: OpenAICompletion, deadline: float | None) -> GenerateCall:
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise BadRequest(f"best_of {req.best_of} differs from n {n}; forge returns every "
                         "completion it generates, so best_of must be null or equal to n", "best_of")
    if len(req.prompt) * n > MAX_ROWS:
        raise BadRequest(f"{len(req.prompt)} prompts x n {n} = {len(req.prompt) * n} completions; "
                         f"at most {MAX_ROWS} in one request", "n")
    temperature = 1.0 if req.temperature is None else req.temperature
    params = SamplingParams(
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        temperature=temperature,  # 0 is greedy, as OpenAI defines it
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=tuple(req.stop or ()),
        logprobs=req.logprobs,
        seed=req.seed,
    )
    return GenerateCall(list(req.prompt), params, n, deadline, "prompt", "max_tokens")


def embed_call(inputs: str | list[str | list[int]], param: str) -> EmbedCall:
    return EmbedCall([inputs] if isinstance(inputs, str) else list(inputs), param)


def seed_response(name: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"result": [{"completion": c["text"]} for c in result["choices"]],
            "timestamp": int(time.time()), "model": name}


def seed_embed_response(name: str, result: dict[str, Any]) -> dict[str, Any]:
    return {"result": [{"embedding": e} for e in result["embeddings"]],
            "timestamp": int(time.time()), "model": name}


def _logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [e["top"] for e in entries],
            "text_offset": [offset + e["offset"] for e in entries]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_response(name: str, result: dict[str, Any], logprobs: bool) -> dict[str, Any]:
    choices = [{"text": c["text"], "index": c["index"],
                "logprobs": _logprobs(c["logprobs"]) if logprobs else None,
                "finish_reason": c["finish_reason"]} for c in result["choices"]]
    return {"id": completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": name, "choices": choices,
            "usage": usage(result["prompt_tokens"], result["completion_tokens"])}


def completion_chunk(cid: str, created: int, name: str, choices: list[dict[str, Any]],
                     logprobs: bool, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    out = [{"text": c["text"], "index": c["index"],
            "logprobs": _logprobs(c["logprobs"]) if logprobs else None,
            "finish_reason": c["finish_reason"]} for c in choices]
    chunk: dict[str, Any] = {"id": cid, "object": "text_completion", "created": created,
                             "model": name, "choices": out}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def embedding_response(name: str, result: dict[str, Any], encoding_format: str) -> dict[str, Any]:
    data = []
    for i, vec in enumerate(result["embeddings"]):
        value: Any = vec
        if encoding_format == "base64":  # little-endian float32, as OpenAI sends it
            value = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = result["prompt_tokens"]
    return {"object": "list", "data": data, "model": name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
