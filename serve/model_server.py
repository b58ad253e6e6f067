"""The model deployment: many fine-tuned checkpoints behind one set of replicas, by name.

Each replica keeps up to ``max_models_per_replica`` engines loaded (Ray Serve model multiplexing:
the least recently used one is evicted, and Serve routes a model's requests to replicas that
have it loaded). The gateway calls it through a handle with ``multiplexed_model_id=<name>``.
Results and errors cross back as plain dicts (``{"error": {...}}`` for a refusal), so the gateway
turns them into HTTP responses without unpickling exception types.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ray import serve

from serve.engine import ModelEngine
from serve.errors import BadRequest, ContextTooLong, NotFound, ServeError
from serve.protocol import EmbedCall, EngineSettings, GenerateCall, Update

logger = logging.getLogger("forge.serve")


def _choice(index: int, u: Update) -> dict[str, Any]:
    return {"index": index, "text": u.text, "finish_reason": u.finish_reason,
            "logprobs": [dataclasses.asdict(t) for t in u.logprobs]}


def _import_model_code(model_uris) -> None:
    """Import the served architectures' transformers code now, at replica start: on a busy
    machine it takes seconds, which would otherwise land on the first request."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from orchestrator import storage

    for model_type in {storage.read_json(storage.join(u, "config.json")).get("model_type")
                       for u in model_uris}:
        try:
            AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
        except Exception:  # unknown or custom architecture: it loads (or fails) on first use
            logger.debug("no eager import for model type %s", model_type)


async def _encode(engine: ModelEngine, text: str, param: str, where: str) -> list[int]:
    """Token ids of ``text``: short texts inline, long ones on a thread (the loop stays free)."""
    if len(text) < 4096:
        return engine.encode(text, param, where)
    return await asyncio.to_thread(engine.encode, text, param, where)


class ModelServer:
    """A replica of the model deployment (``serve.app`` wraps it with ``serve.deployment``)."""

    def __init__(self, models: dict[str, str], settings: EngineSettings,
                 max_models_per_replica: int) -> None:
        self._uris = dict(models)
        self._settings = settings
        self._live: dict[str, ModelEngine] = {}
        self._loads: dict[str, Future] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-load")
        _import_model_code(self._uris.values())

        async def load(name: str) -> ModelEngine:
            # The load runs on its own thread and outlives a client that gives up (shield), so
            # the next request for the model gets the same engine instead of a second load.
            engine = await asyncio.shield(asyncio.wrap_future(self._start_load(name)))
            self._loads.pop(name, None)
            self._live[name] = engine
            return engine

        # Multiplexing set up per instance, so the LRU bound comes from the deployment spec.
        self._get_engine = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(
            load)
        if len(self._uris) <= max_models_per_replica:  # all fit: load them now, not on demand
            for name in self._uris:
                self._start_load(name)

    def _start_load(self, name: str) -> Future:
        future = self._loads.get(name)
        stale = future is not None and future.done() and (
            future.exception() is not None or future.result().closing)
        if future is None or stale:
            future = self._loader.submit(self._load_engine, name)
            self._loads[name] = future
        return future

    def _load_engine(self, name: str) -> ModelEngine:
        start = time.perf_counter()
        engine = ModelEngine(self._uris[name], self._settings)
        logger.info("loaded model %s in %.1f s", name, time.perf_counter() - start)
        return engine

    async def _engine(self) -> ModelEngine:
        name = serve.get_multiplexed_model_id()
        if name not in self._uris:
            raise NotFound(f"model {name!r} not found; see GET /v1/models", "model",
                           "model_not_found")
        try:
            return await self._get_engine(name)
        except Exception as e:
            logger.exception("loading model %s failed", name)
            raise ServeError(503, f"model {name!r} could not be loaded: {type(e).__name__}: {e}",
                             code="model_load_failed", retry_after_s=5) from None

    def status(self) -> dict[str, Any]:
        """This replica's process id and, per loaded model, its rows decoding and waiting and its
        counters (steps, tokens, the most rows decoded together). Evicted models drop out."""
        for name in [n for n, e in self._live.items() if e.closing]:
            del self._live[name]
        return {"pid": os.getpid(), "models": {n: e.load() for n, e in sorted(self._live.items())}}

    def check_health(self) -> None:
        """Serve replaces the replica if a decode thread died."""
        for name, e in self._live.items():
            if not e.closing and not e.alive():
                raise RuntimeError(f"the decode loop of model {name} stopped")

    async def _prompts(self, engine: ModelEngine, call: GenerateCall) -> list[list[int]]:
        out = []
        for i, p in enumerate(call.prompts):
            where = call.prompt_param if len(call.prompts) == 1 else f"{call.prompt_param}[{i}]"
            if isinstance(p, str):
                ids = await _encode(engine, p, call.prompt_param, where)
            else:
                bad = next((t for t in p if not 0 <= t < engine.vocab_size), None)
                if bad is not None:
                    raise BadRequest(f"{where}: token id {bad} is outside the model's vocabulary "
                                     f"(0 to {engine.vocab_size - 1})", call.prompt_param)
                ids = list(p)
            engine.check_fits(len(ids), call.params.max_tokens, call.prompt_param,
                              call.length_param, where)
            out.append(ids)
        return out

    def _submit(self, engine: ModelEngine, call: GenerateCall, prompts: list[list[int]],
                stream: bool) -> tuple[asyncio.Queue, list[int]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        deadline = None
        if call.deadline is not None:
            deadline = time.monotonic() + (call.deadline - time.time())
        ids = []
        for p, prompt in enumerate(prompts):
            for j in range(call.n):
                params = call.params
                if params.seed is not None and j:
                    params = dataclasses.replace(params, seed=params.seed + j)
                index = p * call.n + j

                def sink(u: Update, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, u))

                try:
                    ids.append(engine.submit(prompt, params, sink, stream=stream,
                                             deadline=deadline))
                except RuntimeError:  # evicted between lookup and submit
                    engine.cancel(ids)
                    raise ServeError(503, "the model was just unloaded from this replica; retry",
                                     code="unavailable", retry_after_s=1) from None
        return queue, ids

    @staticmethod
    def _check(u: Update) -> None:
        if u.finish_reason == "timeout":
            raise ServeError(408, "the request ran past its time limit (request_timeout_s) and "
                             "was stopped; ask for fewer tokens or retry", code="request_timeout")
        if u.finish_reason == "error":
            raise ServeError(500, f"internal error while generating: {u.error}")
        if u.finish_reason == "cancelled":  # the engine shut down under the request
            raise ServeError(503, "the model was unloaded while generating; retry",
                             code="unavailable", retry_after_s=1)

    @contextlib.asynccontextmanager
    async def _generation(self, call: GenerateCall, stream: bool):
        """(queue, row ids, prompts) of ``call`` submitted to the engine; on the way out the rows
        are cancelled: a no-op for finished ones, and frees their slots if we were cancelled."""
        engine = await self._engine()
        prompts = await self._prompts(engine, call)
        queue, ids = self._submit(engine, call, prompts, stream=stream)
        try:
            yield queue, ids, prompts
        finally:
            if ids:
                engine.cancel(ids)

    async def complete(self, call: GenerateCall) -> dict[str, Any]:
        """All completions of a request: ``choices`` in prompt-major order, and token counts."""
        try:
            async with self._generation(call, stream=False) as (queue, ids, prompts):
                choices: list[dict[str, Any] | None] = [None] * len(ids)
                completion_tokens = 0
                for _ in ids:
                    index, u = await queue.get()
                    self._check(u)
                    choices[index] = _choice(index, u)
                    completion_tokens += u.completion_tokens
                return {"choices": choices, "prompt_tokens": sum(map(len, prompts)),
                        "completion_tokens": completion_tokens}
        except ServeError as e:
            return {"error": e.to_dict()}

    async def stream(self, call: GenerateCall) -> AsyncIterator[dict[str, Any]]:
        """Text as it is generated: ``{"choices": [...]}`` chunks, then ``{"usage": ...}``."""
        try:
            async with self._generation(call, stream=True) as (queue, ids, prompts):
                yield {"started": True}
                left, completion_tokens = len(ids), 0
                while left:
                    index, u = await queue.get()
                    self._check(u)
                    if u.finish_reason is not None:
                        left -= 1
                        completion_tokens += u.completion_tokens
                    yield {"choices": [_choice(index, u)]}
                yield {"usage": {"prompt_tokens": sum(map(len, prompts)),
                                 "completion_tokens": completion_tokens}}
        except ServeError as e:
            yield {"error": e.to_dict()}

    async def embed(self, call: EmbedCall) -> dict[str, Any]:
        """Mean-pooled, L2-normalised last hidden states of every input."""
        try:
            engine = await self._engine()
            prompts = []
            for i, x in enumerate(call.inputs):
                where = call.param if len(call.inputs) == 1 else f"{call.param}[{i}]"
                if isinstance(x, str) and not x:
                    raise BadRequest(f"{where} is an empty string; there is nothing to embed",
                                     call.param)
                ids = await _encode(engine, x, call.param, where) if isinstance(x, str) else x
                if any(not 0 <= t < engine.vocab_size for t in ids):
                    raise BadRequest(f"{where}: a token id is outside the model's vocabulary",
                                     call.param)
                if len(ids) > engine.context_length:
                    raise ContextTooLong(f"{where} is {len(ids)} tokens, over the model's context "
                                         f"of {engine.context_length} tokens; shorten it",
                                         call.param)
                prompts.append(ids)
            loop = asyncio.get_running_loop()
            done: asyncio.Future = loop.create_future()
            engine.submit_embed(prompts, lambda r: loop.call_soon_threadsafe(done.set_result, r))
            result = await done
            if isinstance(result, Exception):
                raise ServeError(500, f"internal error while embedding: {type(result).__name__}")
            return {"embeddings": result, "prompt_tokens": sum(map(len, prompts))}
        except ServeError as e:
            return {"error": e.to_dict()}
