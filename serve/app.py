"""The Ray Serve application for one checkpoint: the seed completion API over HTTP.

Routes::

    POST /v1/models/<name>/complete   bearer token; {"result": [{"completion"}], "timestamp", "model"}
    GET  /v1/models                   bearer token; the one model this application serves
    GET  /healthz                     no token; 200 once the replica has loaded the model

Auth is on by default: keys come from ``FORGE_API_KEYS`` (comma-separated). With no keys the app
refuses to start unless ``allow_no_auth=True`` is given explicitly. Every error is JSON
``{"error": {"message", "type", "param"}}``; bad input is a 4xx, never a 500.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations
# (``request: Request``) at runtime, and Serve's class-based view cannot resolve string ones.
import hmac
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ray import serve
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator import checkpoints, storage
from orchestrator.checkpoints import CheckpointInfo
from orchestrator.errors import ForgeError
from orchestrator.generation import Sampling
from serve.errors import BadRequest, NotFound, ServeError, Unauthorized

logger = logging.getLogger("forge.serve")

API_KEYS_ENV = "FORGE_API_KEYS"
MAX_BODY_BYTES = 4 << 20  # far above any prompt a 2048-token context can take
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

app = FastAPI(title="forge", docs_url=None, redoc_url=None, openapi_url=None)


# --- the request ----------------------------------------------------------------------------

# What each field accepts, quoted in every 400 so the client can fix the request in one go.
ALLOWED: dict[str, str] = {
    "text": "a string: the prompt, ending with the same separator as the training prompts",
    "top_p": "a number with 0 < top_p <= 1",
    "top_k": "an integer >= 0 (0 turns top-k off; 1 is greedy)",
    "temperature": "a number > 0 (for greedy output use 0.01 or top_k 1)",
    "length": "an integer >= 1: new tokens; prompt tokens + length must fit the model's context",
    "stop_sequences": "a list of at most 16 non-empty strings",
    "repetition_penalty": "a number > 0 (1.0 is no penalty)",
    "n": "an integer from 1 to 16",
}


class CompleteRequest(BaseModel):
    """The seed API's body. Strict: "40" is not 40 and 40.0 is not an integer, unknown fields fail."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    text: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    temperature: float = Field(0.7, gt=0.0)
    length: int = Field(64, ge=1)
    stop_sequences: list[str] = Field(default_factory=list, max_length=16)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=16)

    @field_validator("temperature", mode="before")
    @classmethod
    def _no_zero_temperature(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0:
            raise ValueError("0 is not allowed; for greedy output use temperature 0.01 or top_k 1")
        return v

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, v: list[str]) -> list[str]:
        for i, s in enumerate(v):
            if not s:
                raise ValueError(f"entry {i} is an empty string; stop sequences must not be empty")
        return v


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message naming each bad field and what it accepts, and the first field as ``param``."""
    parts: list[str] = []
    params: list[str] = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = loc[0] if loc else None
        where = ".".join(loc) or "body"
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid"))
        if msg.startswith("Value error, "):
            parts.append(f"{where}: {msg[len('Value error, ') :]}")
        elif kind == "missing":
            parts.append(
                f"{where}: required field is missing; expected {ALLOWED.get(where, 'a value')}"
            )
        elif kind == "extra_forbidden":
            parts.append(f"{where}: unknown field; the fields are {', '.join(ALLOWED)}")
        else:
            got = json.dumps(err.get("input"), default=str)[:80]
            allowed = ALLOWED.get(field or "", "")
            parts.append(
                f"{where}: {msg} (got {got})" + (f"; expected {allowed}" if allowed else "")
            )
        if field:
            params.append(field)
    return "; ".join(parts) or "invalid request", (params[0] if params else None)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_complete_request(body: bytes) -> CompleteRequest:
    """The request body as a validated CompleteRequest; BadRequest naming the field otherwise."""
    if len(body) > MAX_BODY_BYTES:
        raise ServeError(
            413,
            f"the request body is {len(body)} bytes, over the limit of {MAX_BODY_BYTES}",
            type="request_too_large",
        )
    if not body.strip():
        raise BadRequest('the request body is empty; send a JSON object such as {"text": "..."}')
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return CompleteRequest.model_validate(data)
    except ValidationError as e:
        message, param = describe_validation_error(list(e.errors()))
        raise BadRequest(message, param) from None


# --- errors: one JSON shape for every failure ---------------------------------------------


def _json_error(status: int, body: dict[str, Any]) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(ServeError)
async def _on_serve_error(_: Request, exc: ServeError) -> JSONResponse:
    return _json_error(exc.status, exc.body())


@app.exception_handler(RequestValidationError)
async def _on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = describe_validation_error(list(exc.errors()))
    return _json_error(400, BadRequest(message, param).body())


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see GET /v1/models"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return _json_error(exc.status_code, ServeError(exc.status_code, message).body())


@app.exception_handler(Exception)
async def _on_unexpected(_: Request, exc: Exception) -> JSONResponse:
    # A bug or a broken model, never the client's input: still JSON, details only in the log.
    logger.error("internal error: %s: %s", type(exc).__name__, exc)
    return _json_error(500, ServeError(500, f"internal error: {type(exc).__name__}").body())


# --- auth -----------------------------------------------------------------------------------


def parse_api_keys(value: str | None) -> tuple[str, ...]:
    """Keys from a comma-separated string; blanks and surrounding spaces are dropped."""
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


class ApiKeys:
    """Bearer keys for the API. Their repr hides them, so logs, tracebacks and Serve's own
    records of a deployment's arguments never show a key."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys(<{len(self._keys)} hidden>)"

    def check(self, header: str | None) -> None:
        """Raise Unauthorized unless ``header`` is ``Bearer <one of the keys>`` (constant-time)."""
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        given = token.encode()
        ok = False
        for key in self._keys:  # compare with every key: timing must not tell which one matched
            ok |= hmac.compare_digest(given, key)
        if not ok:
            raise Unauthorized("invalid API key")


# --- the deployment -------------------------------------------------------------------------
# ``serve.ingress`` snapshots the app (and so these routes) when the class is defined: every
# module-level name the routes use must be defined above this point.


@serve.deployment(max_ongoing_requests=16, health_check_period_s=10)
@serve.ingress(app)
class CompletionServer:
    """One replica: the checkpoint's engine plus the routes.

    Keys come from ``api_keys`` (``build_app`` passes the driver's ``FORGE_API_KEYS`` as an init
    argument, never through the runtime env, whose env vars Ray logs), else from
    ``FORGE_API_KEYS`` in the replica's own environment (a cluster secret). With none and no
    ``allow_no_auth`` the replica raises at start, so the deployment fails rather than serving
    openly.
    """

    def __init__(
        self,
        model_uri: str,
        name: str,
        api_keys: ApiKeys | None = None,
        allow_no_auth: bool = False,
    ) -> None:
        from serve.engine import CompletionEngine

        keys = api_keys if api_keys else ApiKeys(parse_api_keys(os.environ.get(API_KEYS_ENV)))
        if not keys and not allow_no_auth:
            raise ForgeError(
                f"{API_KEYS_ENV} is empty: set it to one or more comma-separated API keys, or pass "
                "allow_no_auth=True to serve without authentication (not for shared networks)"
            )
        self._keys = keys
        self.name = name
        self.engine = CompletionEngine(model_uri)
        self.created = int(time.time())
        logger.info("serving %s from %s (%d API keys)", name, model_uri, len(keys))

    def _authorize(self, request: Request) -> None:
        if self._keys:
            self._keys.check(request.headers.get("authorization"))

    @app.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        model = {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "forge",
            "context_length": self.engine.context_length,
        }
        return {"object": "list", "data": [model]}

    @app.post("/v1/models/{name}/complete")
    async def complete(self, name: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        if name != self.name:
            raise NotFound(f"model {name!r} not found; this server serves {self.name!r}", "model")
        req = parse_complete_request(await request.body())
        try:
            texts = await run_in_threadpool(
                self.engine.complete, req.text, Sampling.from_obj(req), req.n
            )
        except ServeError:
            raise
        except Exception as e:  # a bug or a broken model, not the client's input
            logger.exception("completion failed")
            raise ServeError(500, f"internal error while generating: {type(e).__name__}") from e
        return {
            "result": [{"completion": t} for t in texts],
            "timestamp": int(time.time()),
            "model": self.name,
        }


# --- building and running -------------------------------------------------------------------


def default_name(path: str, info: CheckpointInfo) -> str:
    """The job folder's name: ``path`` itself, or the parent when ``path`` is a checkpoint folder."""
    uri = storage.normalize(path)
    job_uri = uri.rsplit("/", 1)[0] if info.uri == uri else uri
    return job_uri.rstrip("/").rsplit("/", 1)[-1]


def resolve_target(
    path: str, which: str = "best", name: str | None = None
) -> tuple[CheckpointInfo, str]:
    """The checkpoint to serve and the model name clients will use in the URL."""
    info = checkpoints.resolve(path, which)
    name = name or default_name(path, info)
    if not NAME_RE.fullmatch(name):
        raise ForgeError(
            f"invalid model name {name!r}: use 1-100 letters, digits, '-', '_' or '.', starting "
            "with a letter or digit (pass --name)"
        )
    return info, name


def build_app(
    checkpoint_path: str,
    name: str | None = None,
    *,
    which: str = "best",
    api_keys: Sequence[str] | None = None,
    allow_no_auth: bool = False,
    num_replicas: int = 1,
    ray_actor_options: dict[str, Any] | None = None,
) -> serve.Application:
    """A Serve application for a job folder's chosen checkpoint (or a checkpoint folder).

    ``api_keys`` default to ``FORGE_API_KEYS`` in this process; with none, raises ForgeError
    unless ``allow_no_auth``. Nothing is started here; pass the result to ``serve.run``.
    """
    info, name = resolve_target(checkpoint_path, which, name)
    keys = tuple(api_keys) if api_keys is not None else parse_api_keys(os.environ.get(API_KEYS_ENV))
    if any("," in k or not k.strip() or k != k.strip() for k in keys):
        raise ForgeError("API keys must be non-empty and contain no commas or surrounding spaces")
    if not keys and not allow_no_auth:
        raise ForgeError(
            f"no API keys: set {API_KEYS_ENV}=key1,key2 (clients send 'Authorization: Bearer "
            "key1'), or explicitly allow serving without authentication"
        )
    options = {"num_cpus": 1, **(ray_actor_options or {})}
    deployment = CompletionServer.options(num_replicas=num_replicas, ray_actor_options=options)
    return deployment.bind(info.model_uri, name, ApiKeys(keys), allow_no_auth)


def run(
    checkpoint_path: str,
    name: str | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    blocking: bool = True,
    *,
    which: str = "best",
    address: str | None = None,
    **build_kwargs: Any,
) -> str:
    """Start Serve on ``host:port`` and deploy the checkpoint; returns the model's completion URL.

    Connects to Ray at ``address`` (or ``RAY_ADDRESS``, else a local cluster) unless Ray is
    already initialised. ``blocking`` keeps serving until Ctrl-C.
    """
    import ray

    info, name = resolve_target(checkpoint_path, which, name)
    application = build_app(info.uri, name, which=which, **build_kwargs)
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=name, route_prefix="/")
    url = f"http://{host}:{port}/v1/models/{name}/complete"
    logger.info("serving %s (%s) at %s", name, info.uri, url)
    if blocking:
        print(f"forge: {name} ({info.name}) is ready at {url}; Ctrl-C to stop", flush=True)
        wait_for_stop_signal()
        serve.delete(name)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return url


def wait_for_stop_signal() -> None:
    """Block until SIGINT or SIGTERM. Both are handled explicitly: a background process started by
    a non-interactive shell inherits SIGINT as ignored, and SIGTERM would otherwise kill the
    process without shutting down the Ray cluster it started."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
