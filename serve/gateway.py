"""The HTTP gateway: routes, bearer auth, validation and errors, in front of the model deployment.

Routes (under any ``route_prefix``)::

    GET  /healthz                      no token; 200 once the gateway is up
    GET  /v1/models, /v1/models/<name> the served models (OpenAI's list and retrieve)
    POST /v1/models/<name>/complete    seed API: {"result": [{"completion"}], "timestamp", "model"}
    POST /v1/models/<name>/embed       seed API: {"result": [{"embedding"}], "timestamp", "model"}
    POST /v1/completions               OpenAI-compatible, streaming as server-sent events
    POST /v1/embeddings                OpenAI-compatible

Every failure is JSON ``{"error": {"message", "type", "param", "code"}}``: 400 bad field, 401 bad
token, 404 unknown model or route, 408 past ``request_timeout_s``, 413 body or prompt too large,
503 (or 429) with Retry-After when the model's queue is full. The gateway itself holds no model:
it validates, then calls the model deployment through a handle with the model's name as the
multiplexed model id, so Serve routes each request to a replica that has that model loaded.
"""

# No ``from __future__ import annotations``: FastAPI reads the route methods' annotations at
# runtime, and Serve's class-based view cannot resolve string ones.
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import openai_api as api
from serve.auth import ApiKeys, resolve_api_keys
from serve.errors import NotFound, Overloaded, ServeError, Timeout, TooLarge
from serve.schemas import (
    OpenAICompletion,
    OpenAIEmbedding,
    SeedComplete,
    SeedEmbed,
    describe_validation_error,
    parse_json_object,
    validate,
)

logger = logging.getLogger("forge.serve")

MAX_BODY_BYTES = 4 << 20  # far above any prompt a 2048-token context can take
TIMEOUT_GRACE_S = 2.0  # the replica enforces the deadline; the gateway waits this much longer

app = FastAPI(title="forge", docs_url=None, redoc_url=None, openapi_url=None)


def _json_error(exc: ServeError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@app.exception_handler(ServeError)
async def _on_serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return _json_error(exc)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_error(list(exc.errors()))
    return _json_error(ServeError(400, message, param))


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see GET /v1/models"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _json_error(ServeError(exc.status_code, message))


@app.exception_handler(Exception)
async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug, never the client's input: still JSON, details only in the log.
    logger.error("internal error: %s: %s", type(exc).__name__, exc)
    return _json_error(ServeError(500, f"internal error: {type(exc).__name__}"))


async def read_body(request: Request) -> bytes:
    """The body, refusing more than MAX_BODY_BYTES without reading it all."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise TooLarge(f"the request body is {declared} bytes, over the limit of {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise TooLarge(f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def ray_error(e: BaseException) -> ServeError:
    """What a failed handle call means for the client (backpressure, a replica that died)."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        ReplicaUnavailableError,
    )

    if isinstance(e, BackPressureError):
        return Overloaded(f"the model's queue is full ({e.message}); retry shortly",
                          e.status_code, e.retry_after_s or 1.0)
    if isinstance(e, DeploymentUnavailableError):
        return ServeError(503, "the model deployment is unavailable; retry shortly",
                          code="unavailable", retry_after_s=5)
    if isinstance(e, (RayActorError, ReplicaUnavailableError)):
        return ServeError(503, "the model replica serving this request failed; retry",
                          code="replica_failed", retry_after_s=1)
    logger.error("model call failed: %s: %s", type(e).__name__, e)
    return ServeError(500, f"internal error: {type(e).__name__}")


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """One gateway replica. Keys: ``api_keys`` from ``forge serve``, else the replica's own
    ``FORGE_API_KEYS`` / ``FORGE_API_KEYS_FILE``; with none and no ``allow_no_auth`` the replica
    refuses to start, so the deployment fails rather than serving openly."""

    def __init__(self, model: Any, catalog: dict[str, dict[str, Any]],
                 api_keys: ApiKeys | None = None, allow_no_auth: bool = False,
                 request_timeout_s: float | None = None) -> None:
        self._keys = resolve_api_keys(api_keys, allow_no_auth)
        self._model = model
        self._catalog = catalog
        self._timeout = request_timeout_s
        logger.info("gateway for %s (%d API keys)", ", ".join(catalog), len(self._keys))

    # --- helpers ------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self._keys:
            self._keys.check(request.headers.get("authorization"))

    def _known(self, name: str, param: str | None = None) -> str:
        if name not in self._catalog:
            raise NotFound(f"model {name!r} not found; this server serves "
                           f"{', '.join(sorted(self._catalog))}", param, "model_not_found")
        return name

    def _deadline(self) -> float | None:
        return None if self._timeout is None else time.time() + self._timeout

    def _wait_s(self) -> float | None:
        return None if self._timeout is None else self._timeout + TIMEOUT_GRACE_S

    async def _call(self, name: str, method: str, payload: Any) -> dict[str, Any]:
        response = self._model.options(multiplexed_model_id=name, method_name=method).remote(
            payload)
        return await self._answer(response, response)

    async def _answer(self, answer: Any, pending: Any) -> dict[str, Any]:
        """The model's ``answer`` (a reply or a stream's first chunk) within the time limit, past
        which ``pending`` is cancelled; Ray's failures and the model's error replies raised as
        ServeErrors."""
        try:
            result = await asyncio.wait_for(answer, self._wait_s())
        except asyncio.TimeoutError:
            pending.cancel()
            raise Timeout(f"no answer within request_timeout_s={self._timeout} s") from None
        except Exception as e:
            raise ray_error(e) from None
        if "error" in result:
            raise ServeError.from_dict(result["error"])
        return result

    async def _body(self, request: Request, name: str | None = None) -> dict[str, Any]:
        self._authorize(request)
        if name is not None:
            self._known(name)
        return parse_json_object(await read_body(request))

    # --- routes -------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._catalog[n] for n in sorted(self._catalog)]}

    @app.get("/v1/models/{name}")
    def get_model(self, name: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self._catalog[self._known(name)]

    @app.post("/v1/models/{name}/complete")
    async def seed_complete(self, name: str, request: Request) -> dict[str, Any]:
        req = validate(SeedComplete, await self._body(request, name))
        result = await self._call(name, "complete", api.seed_call(req, self._deadline()))
        return api.seed_response(name, result)

    @app.post("/v1/models/{name}/embed")
    async def seed_embed(self, name: str, request: Request) -> dict[str, Any]:
        req = validate(SeedEmbed, await self._body(request, name))
        result = await self._call(name, "embed", api.embed_call(req.text, "text"))
        return api.seed_embed_response(name, result)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        data = await self._body(request)
        if isinstance(data.get("model"), str):
            self._known(data["model"], "model")
        req = validate(OpenAICompletion, data)
        call = api.openai_call(req, self._deadline())
        if not req.stream:
            result = await self._call(req.model, "complete", call)
            return api.completion_response(req.model, result, req.logprobs is not None)
        return await self._stream(req, call)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> dict[str, Any]:
        data = await self._body(request)
        if isinstance(data.get("model"), str):
            self._known(data["model"], "model")
        req = validate(OpenAIEmbedding, data)
        dims = self._catalog[req.model].get("embedding_dimensions")
        if req.dimensions is not None and req.dimensions != dims:
            raise ServeError(400, f"dimensions {req.dimensions}: this model's embeddings have "
                             f"{dims} dimensions; leave dimensions out or send {dims}", "dimensions")
        result = await self._call(req.model, "embed", api.embed_call(req.input, "input"))
        return api.embedding_response(req.model, result, req.encoding_format or "float")

    async def _stream(self, req: OpenAICompletion, call: Any) -> StreamingResponse:
        """Open the stream; errors before the first token are plain HTTP errors."""
        gen = self._model.options(multiplexed_model_id=req.model, method_name="stream",
                                  stream=True).remote(call)
        await self._answer(gen.__anext__(), gen)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        events = self._events(gen, req.model, req.logprobs is not None, include_usage)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _events(self, gen: Any, name: str, logprobs: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
        cid, created, finished = api.completion_id(), int(time.time()), False
        try:
            async for item in gen:
                if "error" in item:
                    yield api.sse(ServeError.from_dict(item["error"]).body())
                    break
                if "choices" in item:
                    yield api.sse(api.completion_chunk(cid, created, name, item["choices"],
                                                       logprobs))
                elif "usage" in item and include_usage:
                    u = item["usage"]
                    usage = api.usage(u["prompt_tokens"], u["completion_tokens"])
                    yield api.sse(api.completion_chunk(cid, created, name, [], logprobs, usage))
            else:
                finished = True
                yield api.sse("[DONE]")
        except Exception as e:
            yield api.sse(ray_error(e).body())
        finally:
            if not finished:
                gen.cancel()
